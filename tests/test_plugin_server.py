"""The plugin inside SGLang's real server (`python -m sglang.launch_server ... --cascade`) on 127.0.0.1,
with the embedded default MoE as the EAGLE3 target and the default head: no SGLang mocks.

The no-speculation reference server stays up for the module: it produces the reference outputs and
then scores every output teacher-forced (evals/greedy_standard.py). Servers run one OpenMP thread
(on a shared 2-core machine more threads spin-wait on each other and decoding slows ~15x) and sleep
when idle, so a server waiting beside the one at work costs no core.
"""

import json
import pathlib
import subprocess
import urllib.error
import urllib.request

import pytest

from sglang_cascade.plugin.probe import sglang_missing
from sglang_server import Reference, Server, chain_budgets, free_port, launch_cmd, output_ids, server_env

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAD = REPO / "sglang_cascade" / "drafters" / "checkpoints" / "default"
WORKLOADS = ("code", "math", "extraction", "chat")
PER_WORKLOAD = 5            # 20 held-out prompts
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_path():
    reason = sglang_missing()
    if reason:
        pytest.skip(reason)
    from sglang_cascade.models.default_model import ensure_default_moe

    return str(ensure_default_moe(progress=False))


@pytest.fixture(scope="module")
def prompts(model_path):
    """Token ids of the chat-templated held-out prompts (requests carry ids, so scoring sees the same)."""
    from transformers import AutoTokenizer

    from sglang_cascade.workloads import prompts as workload_prompts

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = [p for w in WORKLOADS for p in workload_prompts(w, "heldout", PER_WORKLOAD)]
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for t in texts]


def _one_at_a_time(server, prompts, **extra):
    return [server.generate(p, NEW_TOKENS, **extra) for p in prompts]


@pytest.fixture(scope="module")
def reference(model_path, prompts):
    """The same server without speculation (same attention backend), up for the whole module."""
    server = Server(model_path)
    yield Reference(server, prompts, NEW_TOKENS)
    server.stop()


@pytest.fixture(scope="module")
def near_tie_bound(reference):
    """What bf16 numerics alone move on this machine's kernels (evals/greedy_standard.py)."""
    limit = reference.bound()
    print(f"\nnear-tie bound on this machine: {limit} nats")
    return limit


@pytest.fixture(scope="module")
def cascade(model_path, reference, tmp_path_factory):
    log = tmp_path_factory.mktemp("cascade") / "iterations.jsonl"
    # every request tests (no shared prior, whose back-off may keep later requests plain throughout),
    # so the tests below see speculative and cut rows in every phase of the run
    server = Server(model_path, "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(HEAD),
                    "--cascade", "--cascade-set-iters", "8", "--cascade-prior-samples", "0",
                    "--cascade-iteration-log", str(log), "--enable-metrics")
    server.iteration_log = log
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cascade_alone(cascade, prompts):
    return _one_at_a_time(cascade, prompts)


@pytest.fixture(scope="module")
def cascade_batched(cascade, prompts):
    return cascade.generate(prompts, NEW_TOKENS)   # one batched HTTP request: 20 prompts decode together


@pytest.mark.parametrize("extra, flag", [
    (["--cascade"], "--speculative-algorithm"),
    (["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(HEAD), "--speculative-num-steps",
      "2", "--cascade", "--cascade-candidates", "0,1x1x2,3x1x4"], "--speculative-num-steps"),
])
def test_bad_flags_exit_before_loading_the_model(model_path, extra, flag):
    res = subprocess.run(launch_cmd(model_path, free_port(), *extra), env=server_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    message = next(line for line in res.stderr.splitlines() if line.startswith("sglang-cascade: error:"))
    assert flag in message
    assert "Load weight" not in res.stderr


def test_head_trained_on_another_target_is_refused_when_strict(model_path, tmp_path):
    import shutil

    from sglang_cascade.target_digest import record_head_target

    head = shutil.copytree(HEAD, tmp_path / "head")
    record_head_target(head, "0123456789abcdef")
    res = subprocess.run(launch_cmd(model_path, free_port(), "--speculative-algorithm", "EAGLE3",
                                    "--speculative-draft-model-path", str(head), "--cascade",
                                    "--cascade-strict-target-hash"),
                         env=server_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    message = next(line for line in res.stderr.splitlines() if line.startswith("sglang-cascade: error:"))
    assert "0123456789abcdef" in message and "--cascade-strict-target-hash" in message
    assert "Load weight" not in res.stderr


def test_plain_tier_decodes_as_plain_decoding(model_path, prompts, reference):
    """Cascade held at plain (`--cascade-candidates 0`): every iteration is SGLang's one-token verify,
    which the plugin runs on the CPU backend's decode kernel, and skips the draft extend after it.
    Where the EAGLE server's prefill covers the same tokens as the reference's, every token's logprob
    is equal: the same arithmetic as plain decoding (without the hook, the extend kernel moves them
    from the second token on). The prefills differ where SGLang's radix cache matched a shared
    prefix (the chat template's system prompt): an EAGLE server reuses one token fewer of it, so its
    prefill extends over one token more and rounds differently (`cached_tokens` tells)."""
    server = Server(model_path, "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(HEAD),
                    "--cascade", "--cascade-candidates", "0")
    try:
        held = _one_at_a_time(server, prompts, return_logprob=True)
    finally:
        server.stop()
    same_prefill = 0
    for ref, got in zip(reference.alone, held):
        if ref["meta_info"]["cached_tokens"] == got["meta_info"]["cached_tokens"]:
            same_prefill += 1
            assert ref["meta_info"]["output_token_logprobs"] == got["meta_info"]["output_token_logprobs"]
    print(f"\n{same_prefill}/{len(held)} prompts prefilled over the same tokens; all of their logprobs equal")
    assert same_prefill


def test_plugin_announces_itself_in_every_process(cascade):
    log = cascade.tail(200_000)
    assert "Cascade on: ladder plain s1k1n2 s2k1n3 s3k1n4" in log                       # launcher
    assert log.count("plugin loaded, Cascade on") >= 2, log                           # scheduler, detokenizer
    assert "hooks verified against SGLang 0.5.23" in log


def test_greedy_output_equals_no_speculation(reference, near_tie_bound, cascade_alone):
    """Each prompt alone on both servers, so speculation is the only difference; every token of every
    output within the bound the reference's own outputs set (docs/design.md, greedy equality)."""
    assert len(cascade_alone) == len(WORKLOADS) * PER_WORKLOAD
    verdict = reference.judge(cascade_alone, near_tie_bound)
    # token 0 comes from the prefill, before any speculation: it may differ only where the prefills
    # covered different tokens (see test_plain_tier_decodes_as_plain_decoding)
    first_token = [i for i, (r, c) in enumerate(zip(reference.alone, cascade_alone))
                   if r["output_ids"][0] != c["output_ids"][0]]
    print(f"\nalone: {verdict['identical']}/{verdict['prompts']} identical, {len(first_token)} differ at token 0; "
          f"worst gap per output {verdict['worst_gaps']} (bound {near_tie_bound})")
    assert verdict["passed"], f"outputs with a token beyond the near-tie bound: {verdict['beyond_bound']}"
    for i in first_token:
        assert reference.alone[i]["meta_info"]["cached_tokens"] != cascade_alone[i]["meta_info"]["cached_tokens"]


def test_batched_requests(reference, prompts, near_tie_bound, cascade_batched):
    """20 prompts in one HTTP request, held to the same standard."""
    assert len(cascade_batched) == len(prompts)
    for out in cascade_batched:
        assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) > 0
    verdict = reference.judge(cascade_batched, near_tie_bound)
    print(f"\nbatched: {verdict['identical']}/{verdict['prompts']} identical to the reference alone; worst gap "
          f"per output {verdict['worst_gaps']} (bound {near_tie_bound})")
    assert verdict["passed"], f"outputs with a token beyond the near-tie bound: {verdict['beyond_bound']}"


def test_the_standard_fails_a_dropped_token(reference, near_tie_bound):
    """The check can fail: the reference's own outputs with one token dropped halfway (what a wrong
    acceptance count emits: the output then runs on one token ahead, as the target would have) are
    beyond the bound, in most outputs and so in the verdict."""
    planted = [{"output_ids": ids[:len(ids) // 2] + ids[len(ids) // 2 + 1:]} for ids in output_ids(reference.alone)]
    verdict = reference.judge(planted, near_tie_bound)
    print(f"\none token dropped: {len(verdict['beyond_bound'])}/{verdict['prompts']} outputs beyond the bound")
    assert not verdict["passed"]
    assert len(verdict["beyond_bound"]) >= verdict["prompts"] // 2


def test_meta_info_carries_cascade_figures(cascade_alone, cascade_batched):
    for out in cascade_alone + cascade_batched:
        meta = out["meta_info"]
        fig = meta["cascade"]
        assert set(fig) >= {"config", "config_history", "utility", "phase", "drafts_proposed", "drafts_accepted"}
        assert fig["config_history"][0][0] == 0
        # the plugin counts what ran: one decode iteration per SGLang verify, drafts as accepted
        assert fig["decode_iterations"] == meta["spec_verify_ct"]
        assert fig["drafts_accepted"] == meta["spec_num_correct_drafts"]
        assert fig["drafts_accepted"] <= fig["drafts_proposed"] <= 3 * fig["decode_iterations"]
        assert fig["accepted_beyond_budget"] == 0, fig    # pruning holds each request to its own budget
    # alone, warm-up measures the plain cost first; first decided in a batch, a request tests at once
    assert all(o["meta_info"]["cascade"]["config_history"][0] == [0, "plain"] for o in cascade_alone)
    assert any(o["meta_info"]["cascade"]["config_history"][0][1] != "plain" for o in cascade_batched)
    assert any(o["meta_info"]["cascade"]["speculative_iterations"] for o in cascade_alone), \
        "Cascade never tested speculation"


def _routing(model_path) -> tuple[int, int]:
    """(experts per MoE layer, experts per token) of the served target."""
    config = json.loads((pathlib.Path(model_path) / "config.json").read_text())
    return config["num_local_experts"], config["num_experts_per_tok"]


def test_cut_rows_load_fewer_experts(model_path, cascade, cascade_alone, cascade_batched):
    """The iteration log of the runs above: in a verify where some requests' chains were cut, the
    distinct experts per layer loaded fall below those the rows routed to; elsewhere they are equal."""
    entries = [json.loads(line) for line in cascade.iteration_log.read_text().splitlines()]
    verified = [e for e in entries if e["experts_routed"]]
    assert verified, "no verify was logged"
    experts, _ = _routing(model_path)
    for e in entries:
        assert e["batch"] == len(chain_budgets(e)) == len(e["accepted"]) == len(e["seq_lens"]) and e["wall_s"] > 0
        assert all(a <= b <= e["steps"] for a, b in zip(e["accepted"], chain_budgets(e)))
    for e in verified:
        assert len(e["experts_routed"]) == len(e["distinct_experts"]) == 30          # one count per MoE layer
        assert all(0 < loaded <= routed <= experts for loaded, routed in zip(e["distinct_experts"], e["experts_routed"]))
    cut = [e for e in verified if min(chain_budgets(e)) < e["steps"]]
    uncut = [e for e in verified if min(chain_budgets(e)) == e["steps"]]
    assert cut, "no verify mixed budgets: nothing was pruned"
    assert all(e["distinct_experts"] == e["experts_routed"] for e in uncut)
    routed, loaded = (sum(sum(e[k]) for e in cut) / (30 * len(cut)) for k in ("experts_routed", "distinct_experts"))
    print(f"\n{len(cut)} verifies with cut rows: distinct experts per layer {routed:.2f} routed -> {loaded:.2f} loaded")
    assert loaded < routed


def test_cost_model_learns_routing_from_live_counts(model_path, cascade, cascade_alone, cascade_batched):
    """Every speculative verify's distinct experts per layer (as loaded) reach the controller, whose
    cost model fits its routing estimate eta to them: from its prior 1.0 (independent routing) toward
    the eta the logged counts imply. Without the counts in the IterationRecord eta never moves."""
    import math

    entries = [json.loads(line) for line in cascade.iteration_log.read_text().splitlines()]
    experts, top_k = _routing(model_path)
    q = 1 - top_k / experts
    implied = []
    for e in entries:
        tokens = sum(e["tree_sizes"])
        seen = sum(e["distinct_experts"]) / len(e["distinct_experts"]) if e["distinct_experts"] else 0
        if tokens >= 2 and 0 < seen < experts:
            implied.append((math.log(1 - seen / experts) / math.log(q) - 1) / (tokens - 1))
    assert implied, "no verify with counts was logged"
    target = sorted(implied)[len(implied) // 2]
    first, last = entries[0]["routing_eta"], entries[-1]["routing_eta"]
    print(f"\nrouting eta: prior {first}, after {len(entries)} iterations {last:.3f}; median implied by the "
          f"counts {target:.3f}")
    assert first == 1.0
    assert abs(last - target) < abs(first - target)


def test_warm_up_runs_every_tier_at_budget_0(cascade, cascade_alone):
    """The scheduler's first decode iterations walk steps 3, 2, 1 once with every draft cut, so each
    tier's first-use compile comes before the controller measures anything (in a deployment, in
    SGLang's start-up request; these servers skip it, so in the first prompt, whose output the
    greedy test holds to plain's)."""
    entries = [json.loads(line) for line in cascade.iteration_log.read_text().splitlines()]
    assert [e["steps"] for e in entries[:3]] == [3, 2, 1]
    assert all(chain_budgets(e) == [0] * e["batch"] and not any(e["accepted"]) for e in entries[:3])


def test_draft_extend_skipped_only_before_a_plain_iteration(cascade, cascade_alone, cascade_batched):
    """A plain batch skips its draft extend only where the next iteration's requests stay plain too,
    so no request drafts from the stub state SGLang leaves in place of the skipped extend."""
    entries = [json.loads(line) for line in cascade.iteration_log.read_text().splitlines()]
    skipped = [i for i, e in enumerate(entries) if e["skipped_draft_extend"]]
    assert skipped, "Cascade never skipped a draft extend"
    for i in skipped:
        assert entries[i]["steps"] == 0
        if i + 1 < len(entries):
            nxt = entries[i + 1]
            assert all(b == 0 for rid, b in zip(nxt["rids"], chain_budgets(nxt)) if rid in entries[i]["rids"])


def test_prometheus_series_next_to_sglangs(cascade, cascade_alone, cascade_batched):
    with urllib.request.urlopen(cascade.url + "/metrics", timeout=60) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("sglang:") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    assert any(name.startswith("sglang:spec_") for name in values), "SGLang's own speculative series are missing"
    accepted = sum(o["meta_info"]["cascade"]["drafts_accepted"] for o in cascade_alone + cascade_batched)
    assert values["sglang:cascade_drafts_accepted_total"] >= accepted > 0
    assert values["sglang:cascade_drafts_proposed_total"] >= values["sglang:cascade_drafts_accepted_total"]
    assert 0 <= values["sglang:cascade_speculating_share"] <= 1
    assert 0 <= values["sglang:cascade_mean_budget_steps"] <= 3
    assert values["sglang:cascade_utility_count"] > 0   # finished requests' measured utilities


def test_frontend_program(cascade):
    import sglang as sgl

    @sgl.function
    def qa(s, question):
        s += question + "\n"
        s += sgl.gen("answer", max_tokens=12, temperature=0)

    state = qa.run(question="What is 17 * 3?", backend=sgl.RuntimeEndpoint(cascade.url))
    assert state["answer"].strip()
    assert "cascade" in state.get_meta_info("answer")


def test_malformed_request_gets_sglang_error_and_server_keeps_serving(cascade):
    for body in (b"{not json", {"text": "hi", "sampling_params": {"max_new_tokens": -3}}):
        with pytest.raises(urllib.error.HTTPError) as info:
            cascade.post("/generate", body, timeout=120)
        assert 400 <= info.value.code < 500
        error = json.loads(info.value.read())                 # SGLang's error body, in one of its two shapes
        assert error.get("message") or error["error"]["message"]
    out = cascade.post("/generate", {"text": "def f(x):", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert out["meta_info"]["completion_tokens"] == 4
    assert cascade.proc.poll() is None
