"""The plugin's runtime without a server: tier warm-up, per-request budgets, pruning, expert counts
and the iteration log, driven as SGLang's hooks drive it.

SGLang's batch objects are replaced by the two fields the runtime reads (`rid`, `seqlen` of a
request; `retrieve_next_token` of the verify's spec info): building a real ScheduleBatch needs a
running scheduler, which tests/test_plugin_server.py starts for the end-to-end path.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from sglang_cascade.controller import CascadeConfig, MoEShape
from sglang_cascade.plugin.flags import PluginSettings
from sglang_cascade.plugin.pruned_experts import ExpertCounts
from sglang_cascade.plugin.runtime import CascadeRuntime

SHAPE = MoEShape(num_layers=2, hidden_size=64, num_experts=8, top_k=2, expert_params=3 * 64 * 32,
                 dense_params=10_000, kv_bytes_per_token=512)


def runtime(tmp_path, **cascade) -> CascadeRuntime:
    config = CascadeConfig(candidates="0,1x1x2,3x1x4", warmup_iters=1, trial_iters=2, set_iters=4, prior_samples=0,
                           **cascade)
    rt = CascadeRuntime(PluginSettings(config, (0, 1, 3), str(tmp_path / "its.jsonl")), initial_steps=3)
    rt.attach(SHAPE, "cpu", lambda obj: obj, rank=0)
    return rt


def reqs(*rids):
    return [SimpleNamespace(rid=rid, seqlen=10 + i) for i, rid in enumerate(rids)]


def chains(batch: int, steps: int):
    """retrieve_next_token of `batch` chains of `steps` drafts: node i -> i + 1."""
    nxt = torch.full((batch, steps + 1), -1, dtype=torch.long)
    nxt[:, :steps] = torch.arange(1, steps + 1)
    return SimpleNamespace(retrieve_next_token=nxt)


def log(tmp_path):
    return [json.loads(line) for line in (tmp_path / "its.jsonl").read_text().splitlines()]


def test_the_first_iterations_walk_every_tier_at_budget_0(tmp_path):
    rt = runtime(tmp_path)
    walked = []
    for _ in range(2):
        walked.append(rt.begin(reqs("a")))
        assert rt.warming_up
        info = chains(1, walked[-1])
        assert rt.prune(info, walked[-1]) == [0]
        assert info.retrieve_next_token[0, 0] == -1   # every draft cut: the output stays plain's
        rt.complete([0])
    rt.begin(reqs("a"))
    assert walked == [3, 1] and not rt.warming_up
    assert rt.session.policy.iteration == 0        # the walk was not shown to the controller


def test_each_request_is_cut_at_its_own_budget(tmp_path):
    rt = runtime(tmp_path)
    for _ in range(2):                  # the tier walk
        rt.begin(reqs("a", "b"))
        rt.complete([0, 0])
    seen = set()
    for _ in range(40):
        steps = rt.begin(reqs("a", "b"))
        info = chains(2, steps)
        budgets = rt.prune(info, steps)
        assert steps == max(budgets)
        for row, b in enumerate(budgets):
            kept = info.retrieve_next_token[row]
            assert (kept[:b] >= 0).all() and (b == steps or kept[b] == -1)
        seen.add(tuple(budgets))
        rt.complete([budgets[0], 0])    # a's drafts all accepted, b's none: their rungs part
    assert any(len(set(b)) > 1 for b in seen), f"the batch never mixed budgets: {seen}"
    assert all(f.beyond_budget == 0 for f in rt.session.figures.values())


def test_a_verify_of_another_batch_is_left_alone(tmp_path):
    rt = runtime(tmp_path)
    rt.begin(reqs("a", "b"))
    info = chains(3, 3)
    assert rt.prune(info, 3) is None and (info.retrieve_next_token[:, :3] >= 0).all()


def test_expert_counts_reach_the_controller_and_the_log(tmp_path):
    rt = runtime(tmp_path)
    for _ in range(2):
        rt.begin(reqs("a"))
        rt.complete([0])
    rt.begin(reqs("a"))
    ids = [torch.tensor([[0, 1], [1, 2]]), torch.tensor([[3, 3], [3, 4]])]   # per layer: rows x top-k
    rt.record_experts(ExpertCounts(8, [0, 1], ids, [torch.tensor([[0, 1], [5, 6]]), ids[1]]))
    rt.complete([1])
    line = log(tmp_path)[-1]
    assert line["distinct_experts"] == [3, 2] and line["experts_routed"] == [4, 2]
    assert set(line) >= {"steps", "skipped_draft_extend", "configs", "tree_sizes", "routing_eta"}
    assert rt.session.policy.cost_model.describe()   # the record went through the controller's cost model


def test_a_request_gone_from_the_batch_is_finished(tmp_path):
    rt = runtime(tmp_path)
    rt.begin(reqs("a", "b"))
    rt.complete([0, 0])
    rt.begin(reqs("b"))
    assert set(rt.session.figures) == {"b"}
    assert rt.snapshot("a") is None and rt.snapshot("b")["decode_iterations"] == 1
