"""SGLangAdaptivePolicy (--mode adaptive): same steps as SGLang's own adaptive policy, clear config
errors, no heavy imports in the controller package, and lossless greedy output in the engine."""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine_lossless import PROMPTS

from sglang_cascade.controller import IterationRecord, RequestObservation, SGLangAdaptivePolicy, SpecConfig
from sglang_cascade.controller.adaptive_baseline import DEFAULT_ADAPTIVE_CONFIG, validate_adaptive_config
from sglang_cascade.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sglang_adaptive():
    """SGLang 0.5.23's adaptive_spec_params module (the reference), or skip with the reason."""
    try:
        from sglang.srt.speculative import adaptive_spec_params
    except Exception as e:  # noqa: BLE001 - any import failure means no reference here
        pytest.skip(f"cannot import sglang.srt.speculative.adaptive_spec_params: {type(e).__name__}: {e}")
    return adaptive_spec_params


def record(decided: dict, accepted: dict) -> IterationRecord:
    return IterationRecord(0.01, [RequestObservation(rid, decided[rid], accepted[rid], decided[rid].draft_tokens, 10)
                                  for rid in decided])


def random_config(rng: random.Random) -> dict:
    def knobs(target: dict):
        if rng.random() < 0.5:
            target["ema_alpha"] = rng.choice([0.1, 0.2, 0.5, 1.0, round(rng.uniform(0.05, 1), 3)])
        if rng.random() < 0.5:
            target["update_interval"] = rng.randint(1, 6)
        if rng.random() < 0.5:
            target["warmup_batches"] = rng.randint(0, 12)
        if rng.random() < 0.5:
            target["up_hysteresis"] = rng.choice([0.0, 0.25, round(rng.uniform(-0.5, 0.5), 3)])
        if rng.random() < 0.5:
            target["down_hysteresis"] = rng.choice([0.0, -0.25, round(rng.uniform(-0.5, 0.5), 3)])
        if rng.random() < 0.5:
            target["ceiling_coeff"] = rng.choice([0, 0.5, 1, 1.5, 2.0])
    cfg: dict = {}
    knobs(cfg)
    for bs in rng.sample(range(1, 80), rng.randint(1, 4)):
        steps = rng.sample(range(0, 9), rng.randint(1, 5))
        if rng.random() < 0.3:
            steps.append(steps[0])            # duplicates and any order are allowed, as in SGLang
        entry = {"candidate_steps": steps}
        knobs(entry)
        cfg[str(bs)] = entry
    return cfg


def drive(policy, reference, rng: random.Random, iterations: int, sizes: list[int], transitions: dict):
    """Run both on the same random batches and acceptance; they must agree at every step."""
    bs, p = rng.choice(sizes), rng.random()
    for it in range(iterations):
        if rng.random() < 0.15:
            bs = rng.choice(sizes)
        if rng.random() < 0.05:
            p = rng.choice([0.0, 0.0, 1.0, rng.random()])   # acceptance regimes, incl. none and full
        rids = [f"q{i}" for i in range(bs)]
        decided = policy.decide(rids)
        steps = reference.get_steps_for_batch(bs)
        assert set(decided.values()) == {SpecConfig(steps)}, (it, bs, decided, steps)
        assert SpecConfig(steps).topk == 1 and SpecConfig(steps).draft_tokens == (steps + 1 if steps else 1)
        accepted = {}
        for rid in rids:   # accepted drafts: leading successes with probability p, at most `steps`
            n = 0
            while n < steps and rng.random() < p:
                n += 1
            accepted[rid] = n
        before = {k: s.steps for k, s in policy._slots.items()}
        policy.observe(record(decided, accepted))
        reference.on_verify_complete([accepted[r] for r in rids], bs)
        for key, slot in policy._slots.items():
            ref = reference._slots[key]
            assert (slot.steps, slot.ema, slot.batches) == (ref.current_steps, ref.ema_accept_len, ref._batch_count), \
                (it, key)
            if slot.steps != before[key]:
                kind = "probe" if before[key] == 0 else "up" if slot.steps > before[key] else "down"
                transitions[kind] += 1


def test_default_policy_matches_sglang(sglang_adaptive):
    transitions = {"up": 0, "down": 0, "probe": 0}
    for seed in range(6):
        rng = random.Random(seed)
        initial = rng.choice([0, 1, 3, 5, 7])
        policy = SGLangAdaptivePolicy(initial)
        reference = sglang_adaptive.AdaptiveSpeculativeParams(initial)
        assert reference.candidate_steps == policy.candidate_steps
        drive(policy, reference, rng, 1500, [1, 2, 3, 7, 8, 9, 31, 32, 33, 63, 64, 65, 200], transitions)
    assert all(transitions.values()), transitions   # stepped up, down, and probed out of steps 0


def test_random_configs_match_sglang(sglang_adaptive, tmp_path):
    transitions = {"up": 0, "down": 0, "probe": 0}
    for seed in range(60):
        rng = random.Random(1000 + seed)
        cfg = random_config(rng)
        path = tmp_path / f"cfg{seed}.json"
        path.write_text(json.dumps(cfg))
        union = sorted({s for k, e in cfg.items() if k.isdigit() for s in e["candidate_steps"]})
        initial = rng.choice(union)
        policy = SGLangAdaptivePolicy.from_file(str(path), initial_steps=initial)
        reference = sglang_adaptive.AdaptiveSpeculativeParams(initial, cfg_path=str(path))
        assert policy.candidate_steps == reference.candidate_steps
        keys = sorted(int(k) for k in cfg if k.isdigit())
        sizes = sorted({max(1, k + d) for k in keys for d in (-1, 0, 1)} | {1, 100})
        drive(policy, reference, rng, 400, sizes, transitions)
    assert all(transitions.values()), transitions


def test_probe_from_steps_zero(sglang_adaptive, tmp_path):
    """Steps 0 carries no acceptance signal: the next update probes the next candidate up. A slot that
    starts at 0 has EMA -1, and the probe restarts it at that candidate's neutral value (steps - 1)."""
    cfg = {"1": {"candidate_steps": [0, 2, 4], "down_hysteresis": 0.0}, "warmup_batches": 0, "update_interval": 1}
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(cfg))
    policy = SGLangAdaptivePolicy(0, cfg)
    reference = sglang_adaptive.AdaptiveSpeculativeParams(0, cfg_path=str(path))
    seq, emas = [], []
    for accepted in [0] * 6 + [2] * 8 + [4] * 8 + [0] * 10:
        decided = policy.decide(["a"])
        steps = decided["a"].steps
        assert steps == reference.get_steps_for_batch(1)
        seq.append(steps)
        policy.observe(record(decided, {"a": min(accepted, steps)}))
        reference.on_verify_complete([min(accepted, steps)], 1)
        assert policy._slots[1].ema == reference._slots[1].ema_accept_len
        emas.append(policy._slots[1].ema)
    assert seq == [0, 2, 2, 2, 2, 0, 2, 2, 2, 2, 2, 2] + [4] * 14 + [2] * 5 + [0]
    assert emas[0] == 1.0                       # probe from a never-drafted slot: EMA reset to 2 - 1
    assert emas[5] == emas[4] > 0               # probe after a plain interval keeps the EMA


def test_overridden_requests_do_not_feed_the_slot():
    """A request that ran another configuration than decided counts in the batch size only."""
    policy = SGLangAdaptivePolicy(3, {"1": {"candidate_steps": [1, 3]}, "warmup_batches": 0, "update_interval": 1})
    decided = policy.decide(["a", "b"])
    obs = [RequestObservation("a", decided["a"], 3, 4, 5), RequestObservation("b", SpecConfig(0), 0, 1, 5)]
    policy.observe(IterationRecord(0.01, obs))
    slot = policy._slots[1]
    assert slot.ema == pytest.approx(0.8 * 2 + 0.2 * 3) and slot.batches == 1
    stats = policy.request_stats("a")
    json.dumps(stats), json.dumps(policy.summary())
    assert stats["steps"] == 3 and stats["slot"] == "1" and stats["slot_ema_accept_len"] == slot.ema
    policy.finish_request("a")
    with pytest.raises(KeyError):
        policy.request_stats("a")
    assert policy.summary()["requests_finished"] == 1


@pytest.mark.parametrize("cfg, needle", [
    ([1, 2], "JSON object"),
    ({}, "at least one batch-size key"),
    ({"ema_alpha": 0.3}, "at least one batch-size key"),
    ({"1": {"candidate_steps": []}}, "BS 1: candidate_steps"),
    ({"1": {"candidate_steps": [1, -2]}}, r"\[1, -2\]"),
    ({"1": {"candidate_steps": "1,3"}}, "'1,3'"),
    ({"1": {"candidate_steps": [1, 2.5]}}, "non-negative ints"),
    ({"1": {"candidate_steps": [1, True]}}, "non-negative ints"),
    ({"1": [1, 3]}, "BS 1: expected an object"),
    ({"0": {"candidate_steps": [1]}}, "'0' must be >= 1"),
    ({"1": {"candidate_steps": [1]}, "01": {"candidate_steps": [2]}}, "repeats batch size 1"),
    ({"1": {"candidate_steps": [1], "ema_alpha": 0}}, "BS 1: ema_alpha must be a number in \\(0, 1\\], got 0"),
    ({"1": {"candidate_steps": [1]}, "ema_alpha": 1.5}, "top level: ema_alpha .* got 1.5"),
    ({"1": {"candidate_steps": [1]}, "update_interval": 0}, "update_interval must be an integer >= 1, got 0"),
    ({"1": {"candidate_steps": [1]}, "warmup_batches": 2.5}, "warmup_batches .* got 2.5"),
    ({"1": {"candidate_steps": [1], "ceiling_coeff": -1}}, "ceiling_coeff .* got -1"),
    ({"1": {"candidate_steps": [1], "down_hysteresis": "x"}}, "down_hysteresis must be a finite number, got 'x'"),
    ({"1": {"candidate_steps": [1], "up_hysterisis": 0.1}}, "unknown key 'up_hysterisis'"),
    ({"1": {"candidate_steps": [1]}, "batch": 3}, "unknown key 'batch'"),
    ({"1": {"candidate_steps": [1]}, "candidate_steps": [1, 3]}, "belongs inside each batch-size key"),
])
def test_bad_configs_are_refused_naming_key_and_value(cfg, needle):
    with pytest.raises(ValueError, match=needle):
        SGLangAdaptivePolicy(1, cfg)


def test_bad_initial_steps_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"initial_steps 4 is not in .*\[0, 1, 3, 5, 7\]"):
        SGLangAdaptivePolicy(4)
    with pytest.raises(ValueError, match="cannot read adaptive config"):
        SGLangAdaptivePolicy.from_file(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SGLangAdaptivePolicy.from_file(str(bad))
    assert validate_adaptive_config(DEFAULT_ADAPTIVE_CONFIG)[32]["candidate_steps"] == [0, 1]


def parse_engine(argv):
    parser = argparse.ArgumentParser()
    EngineConfig.add_cli_args(parser)
    return EngineConfig.from_cli_args(parser.parse_args(argv))


def test_engine_flags(tmp_path):
    cfg = parse_engine(["--mode", "adaptive"])
    assert (cfg.adaptive_initial_steps, cfg.adaptive_config) == (3, None) and cfg.max_tree() == 8
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"1": {"candidate_steps": [0, 2]}, "4": {"candidate_steps": [0, 1]}}))
    cfg = parse_engine(["--mode", "adaptive", "--adaptive-config", str(path), "--adaptive-initial-steps", "2"])
    assert cfg.max_tree() == 3 and cfg.adaptive_policy().steps_for(1) == 2 and cfg.adaptive_policy().steps_for(5) == 1
    with pytest.raises(ValueError, match=r"--adaptive-initial-steps 3: .*\[0, 1, 2\]; pass one of those"):
        parse_engine(["--mode", "adaptive", "--adaptive-config", str(path)])
    with pytest.raises(ValueError, match="--adaptive-config .*missing.json: cannot read .*leave the flag out"):
        parse_engine(["--mode", "adaptive", "--adaptive-config", str(tmp_path / "missing.json")])
    path.write_text(json.dumps({"1": {"candidate_steps": [1], "ema_alpha": 2}}))
    with pytest.raises(ValueError, match="--adaptive-config .*ema_alpha must be a number in"):
        parse_engine(["--mode", "adaptive", "--adaptive-config", str(path), "--adaptive-initial-steps", "1"])
    assert parse_engine(["--mode", "cascade", "--adaptive-initial-steps", "4"]).mode == "cascade"  # unused: ignored


def test_server_and_cli_accept_mode_adaptive():
    from sglang_cascade.server.launch import add_server_args
    args = add_server_args(argparse.ArgumentParser()).parse_args(["--mode", "adaptive", "--adaptive-initial-steps", "1"])
    assert EngineConfig.from_cli_args(args).mode == "adaptive"
    out = subprocess.run([sys.executable, "-m", "sglang_cascade.cli", "generate", "--help"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parents[1])
    assert "adaptive" in out.stdout and "--adaptive-config" in out.stdout


def _engine_outputs(tiny_pair, mode, **kw):
    """Greedy outputs of PROMPTS, 4 running at a time (as tests/test_engine_lossless.py does)."""
    model, head = tiny_pair
    engine = Engine(EngineConfig(mode=mode, max_batch=4, max_context=256, **kw), model=model, head=head)
    for i, ids in enumerate(PROMPTS):
        engine.add_request(GenerationRequest(f"r{i}", ids, SamplingParams(max_new_tokens=24)))
    outs, meta = {}, {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
            meta[o.rid] = o.meta
    return engine, [outs[f"r{i}"] for i in range(len(PROMPTS))], [meta[f"r{i}"] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def plain_tokens(tiny_pair):
    return _engine_outputs(tiny_pair, "plain")[1]


@pytest.mark.parametrize("adaptive_cfg", [
    None,   # SGLang's defaults: batches of <= 4 use slot "1", steps 1/3/5/7
    {"1": {"candidate_steps": [1, 3, 5]}, "2": {"candidate_steps": [0, 1, 2]}, "4": {"candidate_steps": [0, 3]},
     "warmup_batches": 1, "update_interval": 2, "down_hysteresis": 0.3},
])
def test_adaptive_mode_matches_plain(tiny_pair, plain_tokens, tmp_path, adaptive_cfg):
    kw = {}
    if adaptive_cfg is not None:
        path = tmp_path / "adaptive.json"
        path.write_text(json.dumps(adaptive_cfg))
        kw = {"adaptive_config": str(path), "adaptive_initial_steps": 1}
    engine, outs, meta = _engine_outputs(tiny_pair, "adaptive", **kw)
    assert outs == plain_tokens
    assert sum(m["spec_accepted_drafts"] for m in meta) > 0
    assert all("cascade" not in m and m["adaptive"]["policy"] == "sglang-adaptive" for m in meta)
    summary = engine.controller.summary()
    json.dumps(summary)
    assert summary["speculative_iteration_share"] > 0
    if adaptive_cfg is not None:   # the fast-switching config really switched
        assert sum(s["switches"] for s in summary["slots"].values()) > 0
    info = engine.server_info()
    assert info["mode"] == "adaptive" and info["adaptive"]["initial_steps"] == engine.cfg.adaptive_initial_steps


def test_both_policies_implement_the_written_interface():
    """Engines drive policies through SpecPolicy only; a method missing on one would fail at serving."""
    from sglang_cascade.controller import CascadeConfig, CascadeController, MoECostModel, MoEShape, SpecPolicy

    shape = MoEShape(num_layers=2, hidden_size=8, num_experts=4, top_k=2, expert_params=10, dense_params=100,
                     kv_bytes_per_token=16)
    for policy in (SGLangAdaptivePolicy(), CascadeController(CascadeConfig(), MoECostModel(shape))):
        assert isinstance(policy, SpecPolicy), type(policy).__name__


def test_adaptive_policy_is_plain_ahead_only_where_no_slot_can_draft():
    """SGLang's EMA may raise any slot's steps at its next update: only all-zero candidates are sure."""
    assert not SGLangAdaptivePolicy().plain_ahead(["a"], pending=1)
    only_plain = {"1": {"candidate_steps": [0]}}
    assert SGLangAdaptivePolicy(0, only_plain).plain_ahead(["a"], pending=1)
