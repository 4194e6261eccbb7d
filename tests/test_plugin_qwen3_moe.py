"""Cascade in SGLang's real server on a Qwen3-MoE target (the family users serve, e.g. Qwen3-30B-A3B;
the other plugin tests run Mixtral-class targets). SGLang's Qwen3-MoE captures EAGLE3 aux states
itself, and its sparse blocks route through the same `TopK` the plugin hooks, so nothing here is
Qwen-specific in the plugin: these tests check that this holds for real.

Target: a tiny random transformers `Qwen3MoeForCausalLM` (4 layers, 8 experts, top-2), with an
EAGLE-3 head fitted to it. Half the prompts are the head's own training prompts (drafts accepted
often), half are not (rarely), so Cascade gives requests of one batch different budgets and cuts
rows. No tokenizer: requests carry input_ids. One server at a time: Cascade first, then the
no-speculation reference, which must still be up to score Cascade's outputs under the project's
greedy standard (evals/greedy_standard.py).
"""

import json

import pytest

from sglang_cascade.plugin.probe import sglang_missing

from sglang_server import Reference, Server, chain_budgets
from tiny_models import VOCAB

pytestmark = pytest.mark.slow

PROMPTS = [[28, 23, 13, 12], [6, 9, 2, 4], [29, 46, 2, 20], [45, 41, 41, 23],   # trained_tiny_head's own
           [1, 2, 3], [7], [12, 40, 3, 3, 8], [19, 6]]
NEW_TOKENS = 32
LAYERS, EXPERTS = 4, 8   # every layer sparse (decoder_sparse_step 1, no mlp_only_layers)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    reason = sglang_missing()
    if reason:
        pytest.skip(reason)
    from tiny_models import tiny_qwen3_moe_target, trained_tiny_head

    root = tmp_path_factory.mktemp("qwen3-moe")
    # seed 3: of seeds 0-5, the target whose greedy text the tiny head (draft vocabulary = ids 8 and
    # up) predicts best; others emit ids below 8 often, which no draft can hit
    target = tiny_qwen3_moe_target(seed=3)
    trained_tiny_head(target).save_pretrained(root / "head")    # aux ids [0, 1, 2]: distinct, below L-1
    target.save_pretrained(root / "target")
    return root / "target", root / "head"


@pytest.fixture(scope="module")
def cascade(checkpoints, tmp_path_factory):
    """Cascade's outputs (each prompt alone, then all in one request) and its iteration log; the
    server stops before the reference starts."""
    log = tmp_path_factory.mktemp("cascade") / "iterations.jsonl"
    # no shared prior: every request tests speculation, so batches mix budgets
    server = Server(str(checkpoints[0]), "--skip-tokenizer-init", "--speculative-algorithm", "EAGLE3",
                    "--speculative-draft-model-path", str(checkpoints[1]), "--cascade", "--cascade-set-iters", "8",
                    "--cascade-prior-samples", "0", "--cascade-iteration-log", str(log))
    try:
        alone = [server.generate(p, NEW_TOKENS) for p in PROMPTS]
        batched = server.generate(PROMPTS, NEW_TOKENS)
        server_log = server.tail(1_000_000)
    finally:
        server.stop()
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return {"alone": alone, "batched": batched, "iterations": entries, "log": server_log}


class _TinyVocabServer(Server):
    """SGLang 0.5.23 reports input token id vocab_size - 1 as 0 in input_token_logprobs (a clip meant
    for image-placeholder hashes, managers/scheduler_components/logprob_result_processor.py). Real
    checkpoints pad their vocabulary, so that id never occurs; in the tiny one it is a real token, which
    greedy_standard's alignment check would refuse. Where a request sent it, restore it."""

    def post(self, path, body, timeout=600):
        answer = super().post(path, body, timeout)
        start = body.get("logprob_start_len", -1) if isinstance(body, dict) else -1
        if start >= 0 and isinstance(answer, dict):
            for entry, sent in zip(answer["meta_info"]["input_token_logprobs"], body["input_ids"][start:]):
                if sent == VOCAB - 1 and entry[1] == 0:
                    entry[1] = sent
        return answer


@pytest.fixture(scope="module")
def verdict(checkpoints, cascade):
    """The no-speculation server's variants (each prompt alone, all batched, in batches of a few
    sizes), the bound they set and the verdicts on Cascade's outputs, all scored while that server is up."""
    server = _TinyVocabServer(str(checkpoints[0]), "--skip-tokenizer-init")
    try:
        reference = Reference(server, PROMPTS, NEW_TOKENS)
        limit = reference.bound()
        return {mode: reference.judge(cascade[mode], limit) for mode in ("alone", "batched")}
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["alone", "batched"])
def test_greedy_output_meets_the_standard(verdict, mode):
    """Every token of every Cascade output lies within the bound the no-speculation server's own
    variants set, by that server's teacher-forced scores (evals/greedy_standard.py)."""
    v = verdict[mode]
    print(f"\nCascade {mode}: {v['identical']}/{v['prompts']} identical to no speculation (alone); bound "
          f"{v['bound']} nats; worst gaps {v['worst_gaps']}; beyond the bound {v['beyond_bound']}")
    assert v["passed"], v


def test_budgets_hold_and_drafts_are_accepted(cascade):
    assert "hooks verified against SGLang 0.5.23" in cascade["log"]
    outputs = cascade["alone"] + cascade["batched"]
    assert len(cascade["batched"]) == len(PROMPTS)
    assert all(o["meta_info"]["completion_tokens"] == len(o["output_ids"]) == NEW_TOKENS for o in outputs)
    figures = [o["meta_info"]["cascade"] for o in outputs]
    assert all(f["accepted_beyond_budget"] == 0 for f in figures), figures
    accepted = sum(f["drafts_accepted"] for f in figures)
    print(f"\n{accepted} drafts accepted of {sum(f['drafts_proposed'] for f in figures)} proposed; per output "
          f"{[f['drafts_accepted'] for f in figures]}")
    assert accepted > 0, "no draft was accepted: speculation never ran"


def test_cut_rows_load_fewer_experts(cascade):
    """SGLang's Qwen3-MoE routes through the hooked TopK.forward: one count per sparse layer in each
    verify; cut rows take their root row's experts, so they load no expert of their own."""
    entries = cascade["iterations"]
    verified = [e for e in entries if e["experts_routed"]]
    assert verified, "no verify was logged"
    for e in entries:
        assert e["batch"] == len(chain_budgets(e)) == len(e["accepted"]) == len(e["seq_lens"])
        assert all(a <= b <= e["steps"] for a, b in zip(e["accepted"], chain_budgets(e)))
    for e in verified:
        assert len(e["experts_routed"]) == len(e["distinct_experts"]) == LAYERS
        assert all(0 < loaded <= routed <= EXPERTS for loaded, routed in zip(e["distinct_experts"], e["experts_routed"]))
    cut = [e for e in verified if min(chain_budgets(e)) < e["steps"]]
    mixed = [e for e in cut if max(chain_budgets(e)) > 0]   # not the start-up tier walk (every budget 0)
    uncut = [e for e in verified if min(chain_budgets(e)) == e["steps"]]
    assert mixed, "no verify mixed budgets: nothing was pruned outside the tier walk"
    assert all(e["distinct_experts"] == e["experts_routed"] for e in uncut)

    def mean(rows, key):
        return sum(sum(e[key]) for e in rows) / (LAYERS * len(rows))

    print(f"\n{len(cut)} verifies with cut rows ({len(mixed)} with mixed budgets), {len(uncut)} uncut: distinct "
          f"experts per layer {mean(cut, 'experts_routed'):.2f} routed -> {mean(cut, 'distinct_experts'):.2f} loaded "
          f"(mixed: {mean(mixed, 'experts_routed'):.2f} -> {mean(mixed, 'distinct_experts'):.2f})")
    assert mean(cut, "distinct_experts") < mean(cut, "experts_routed")
