"""The replay: its bookkeeping against hand-computed figures on the committed CI trace, the oracle, the
policies it runs being the project's own classes, and the smoke report end to end."""

import json

import pytest

from evals.replay import run_replay, simulate, traces
from evals.replay.profiles import Batch, CpuProfile, H100Profile
from evals.replay.simulate import Prompt, StaticPolicy, requests_for, step_cost_table
from sglang_cascade.controller import (PLAIN, CascadeConfig, CascadeController, MoECostModel,
                                       SGLangAdaptivePolicy, SpecConfig, SpecPolicy)
from sglang_cascade.controller.confidence_budget import ConfidenceBudgetPolicy
from sglang_cascade.engine.tree import DraftTree


@pytest.fixture(scope="module")
def setup():
    trace = traces.load(traces.CI_TRACE)
    prompts = [Prompt(e, trace["trees"]) for e in trace["requests"]]
    cpu = CpuProfile(trace)
    return trace, prompts, cpu, H100Profile(cpu.noise_sigma)


def test_plain_throughput_is_one_token_per_profiled_step(setup):
    """Noise-free plain decoding of one request: prefill, then one token per iteration at the profile's
    plain step time for that position's context and experts."""
    trace, prompts, cpu, h100 = setup
    for profile in (cpu, h100):
        prompt = prompts[0]
        (req,) = requests_for([prompt], 1, None, seed=3, length=prompt.length)
        res = simulate.simulate(StaticPolicy(PLAIN), profile, [req], max_running=1)
        expected = profile.prefill_s([prompt.prompt_tokens])
        for e in range(1, prompt.length):
            p = (req.start + e - 1) % prompt.positions
            counts = [m.bit_count() for m in prompt.masks(p, PLAIN)]
            expected += profile.iteration_s(Batch([PLAIN], [prompt.prompt_tokens + p], profile.experts(counts, 1)))[0]
        assert res.tokens == prompt.length and res.iterations == prompt.length - 1
        assert res.makespan_s == pytest.approx(expected, rel=1e-9)


def test_speculation_emits_what_the_trace_accepts(setup):
    trace, prompts, cpu, _ = setup
    prompt, cfg = prompts[2], SpecConfig(3)
    (req,) = requests_for([prompt], 1, None, seed=1, length=prompt.length)
    res = simulate.simulate(StaticPolicy(cfg), cpu, [req], max_running=1)
    e, iterations = 1, 0
    while e < prompt.length:
        e += min(prompt.accepted((req.start + e - 1) % prompt.positions, cfg) + 1, prompt.length - e)
        iterations += 1
    assert res.iterations == iterations and res.tokens == prompt.length


def test_a_policy_that_always_chooses_plain_gets_plains_throughput(setup):
    """Cascade held to a plain-only ladder runs exactly plain's iterations, noise included."""
    trace, prompts, cpu, h100 = setup
    for profile in (cpu, h100):
        runs = []
        for policy in (StaticPolicy(PLAIN), CascadeController(CascadeConfig(candidates="0"), MoECostModel(profile.shape))):
            reqs = requests_for(prompts, 12, 50.0, seed=2)
            runs.append(simulate.simulate(policy, profile, reqs, 4, noise_sigma=0.08, seed=2).tokens_per_s)
        assert runs[0] == runs[1]


def test_the_saturated_window_counts_only_full_batches(setup):
    """Throughput is read where the batch is full; a run that never fills it has no saturated window,
    whatever the policy (the confidence budget's draft-cost branch once overwrote the 'batch full' flag)."""
    trace, prompts, cpu, _ = setup
    cost = step_cost_table(cpu, prompts, trace["target"]["num_experts"], trace["target"]["top_k"])
    for policy in (StaticPolicy(SpecConfig(3)), ConfidenceBudgetPolicy(cost, max_steps=traces.CHAIN_STEPS)):
        reqs = requests_for(prompts, 6, 0.01, seed=4)   # arrivals far apart: one request at a time
        res = simulate.simulate(policy, cpu, reqs, max_running=4)
        assert res.saturated_s == 0 and res.tokens > 0


def test_the_replayed_policies_are_the_projects_classes(setup):
    trace, prompts, cpu, _ = setup
    made = {name: make() for name, make in run_replay.policies(cpu, step_cost_table(cpu, prompts, 16, 4)).items()}
    assert type(made["cascade"]) is CascadeController
    assert type(made["sglang-adaptive"]) is SGLangAdaptivePolicy
    assert type(made["confidence-budget"]) is ConfidenceBudgetPolicy
    assert {n for n in made if n.startswith("static")} == {f"static {c.label()}" for c in CascadeConfig().ladder[1:]}
    assert all(isinstance(p, SpecPolicy) for p in made.values())


def test_expert_mapping_and_h100_step(setup):
    _, _, _, h100 = setup
    one = h100.experts([4] * 30, 1)
    assert one == [8] * 48                                   # one token: its top-8
    assert h100.experts([12] * 30, 256) == [128] * 48        # load-balanced routing: every expert
    assert 3e-3 < h100.iteration_s(Batch([PLAIN], [300], one))[0] < 8e-3   # ~5 ms per token at batch 1


def test_merge_keys_nodes_by_token_path():
    a = DraftTree([9, 1, 2], [-1, 0, 1])
    b = DraftTree([9, 1, 3, 4], [-1, 0, 0, 1])
    merged, rows = traces._merge([a, b])
    assert merged.tokens == [9, 1, 2, 3, 4] and merged.parents == [-1, 0, 1, 0, 1]
    assert rows == [[0, 1, 2], [0, 1, 3, 4]]


def test_smoke_report(tmp_path):
    payload = run_replay.main(["--smoke", "--concurrency", "1,8", "--results-dir", str(tmp_path)])
    rows = payload["results"]
    assert {r["profile"] for r in rows} == {"cpu", "h100"} and {r["concurrency"] for r in rows} == {1, 8}
    for r in rows:
        statics = {k: v["tokens_per_s"] for k, v in r["policies"].items() if k == "plain" or k.startswith("static")}
        assert r["oracle"] in statics and r["oracle_tokens_per_s"] == max(statics.values())
        assert r["cascade_vs_oracle"] == pytest.approx(r["policies"]["cascade"]["tokens_per_s"] / max(statics.values()))
        # two seeds per cell (smoke): medians of the seeds' figures, ratios' ranges from each seed's own oracle
        seeds = [[s["tokens_per_s"] for s in v["per_seed"]] for v in r["policies"].values()]
        assert all(len(x) == 2 for x in seeds) and any(x[0] != x[1] for x in seeds)
        for v in r["policies"].values():
            assert v["tokens_per_s"] == pytest.approx(sum(s["tokens_per_s"] for s in v["per_seed"]) / 2)
        ratios = [r["policies"]["cascade"]["per_seed"][i]["tokens_per_s"]
                  / max(v["per_seed"][i]["tokens_per_s"] for k, v in r["policies"].items() if k in statics) for i in (0, 1)]
        assert r["cascade_vs_oracle_range"] == pytest.approx([min(ratios), max(ratios)])
    saved = json.loads((tmp_path / "replay_smoke.json").read_text())
    assert set(saved["goals"]) == {"cpu/1", "cpu/8", "h100/1", "h100/8"}
    assert (tmp_path / "replay_smoke.md").read_text().count("| cpu |") == 2 * len(run_replay.WORKLOADS)
    assert (tmp_path / "replay_smoke_throughput.png").stat().st_size > 0
    assert (tmp_path / "replay_smoke_cascade_choices.png").stat().st_size > 0


def test_validation_replays_each_measured_round_as_served(setup, tmp_path):
    """A measured report whose figures are the replay's own (a closed loop over the round's requests with
    their output lengths, averaged over rounds) validates with zero error; halving the measured figure
    shows as +100%."""
    trace, prompts, cpu, _ = setup
    by_w = {}
    for p in prompts:
        by_w.setdefault(p.workload, []).append(p)
    w = next(iter(by_w))
    lengths = [[9, 14, 5], [12, 7, 10]]
    requests, per_round = [], []
    for rnd, ls in enumerate(lengths):
        reqs = [simulate.ReplayRequest(f"r{rnd}-{j}", by_w[w][j % len(by_w[w])], 0.0, 0, n) for j, n in enumerate(ls)]
        per_round.append(simulate.simulate(StaticPolicy(SpecConfig(3)), cpu, reqs, 2, cpu.noise_sigma, 7 + rnd).tokens_per_s)
        requests += [{"rid": r.rid, "workload": "mixed", "concurrency": 2, "mode": "static 3x1x4", "round": rnd,
                      "served_workload": w, "output_tokens": r.length, "error": None} for r in reqs]
    measured = sum(per_round) / 2
    cells = [{"workload": "mixed", "concurrency": 2, "mode": "static 3x1x4", "rounds": 2, "tokens_per_s": measured},
             {"workload": "mixed", "concurrency": 2, "mode": "plain", "rounds": 2, "tokens_per_s": 1.0}]
    report = tmp_path / "eval_report_engine.json"
    report.write_text(json.dumps({"cells": cells, "requests": requests, "commit": "abc"}))
    args = type("Args", (), {"seed": 7, "trace_experts": (trace["target"]["num_experts"], trace["target"]["top_k"])})
    v = run_replay.validate(cpu, by_w, args, report)
    assert [c["mode"] for c in v["cells"]] == ["static 3x1x4"]   # plain measured no requests here: not replayed
    assert v["cells"][0]["error"] == pytest.approx(0.0, abs=1e-12) and v["commit_measured"] == "abc"
    cells[0]["tokens_per_s"] = measured / 2
    report.write_text(json.dumps({"cells": cells, "requests": requests, "commit": "abc"}))
    assert run_replay.validate(cpu, by_w, args, report)["cells"][0]["error"] == pytest.approx(1.0)
