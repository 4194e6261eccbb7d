"""Cascade controller: synthetic traces, state-machine properties, cost model, flags, import hygiene."""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from sglang_cascade.controller import (PLAIN, CascadeConfig, CascadeController, IterationRecord, MoECostModel,
                                       MoEShape, Phase, RequestObservation, SpecConfig)
from sglang_cascade.controller.config import BATCH_COSTS
from sglang_cascade.controller.state import ALLOWED_TRANSITIONS

# A small MoE's shape (30 layers, 16 experts, top-4, fp32; the embedded default MoE's before its top-1 rebuild).
SHAPE = MoEShape(num_layers=30, hidden_size=576, num_experts=16, top_k=4, expert_params=3 * 576 * 96,
                 dense_params=70_000_000, kv_bytes_per_token=2 * 30 * 192 * 4, bytes_per_param=4,
                 draft_params=10_000_000)


def controller(**kw):
    return CascadeController(CascadeConfig(**kw), MoECostModel(SHAPE))


def run_batch1(ctl, rid, iters, accepted_of, cost_of, rng=None):
    """Drive one request alone for `iters` iterations; returns the config per iteration."""
    ctl.add_request(rid)
    ran = []
    for _ in range(iters):
        cfg = ctl.decide([rid])[rid]
        noise = 1 + rng.uniform(-0.03, 0.03) if rng else 1.0
        obs = RequestObservation(rid, cfg, accepted_of(cfg), cfg.draft_tokens, 100 + len(ran))
        ctl.observe(IterationRecord(0.02 * cost_of(cfg) * noise, [obs]))
        ran.append(cfg)
    return ran


def test_losing_speculation_goes_plain_and_backs_off():
    ctl = controller()
    cfg = ctl.config
    run_batch1(ctl, "r", 1200, lambda c: 0, lambda c: 1.3 if c.speculative else 1.0)
    stats = ctl.request_stats("r")
    phases = stats["phase_history"]
    assert phases[0] == [0, "base"] and phases[1] == [cfg.warmup_iters, "test"]
    # first test phase = one trial of the smallest speculative rung, then plain
    assert phases[2] == [cfg.warmup_iters + cfg.trial_iters, "set"]
    assert stats["config_history"][:3] == [[0, "plain"], [3, "s1k1n2"], [7, "plain"]]
    assert stats["utility"]["s1k1n2"] == pytest.approx(1 / 1.3)
    # re-tests only on the back-off schedule: each test is one trial, plain set phases double to the cap
    starts = {"test": [], "set": []}
    for it, phase in phases[1:]:
        starts[phase].append(it)
    assert all(s - t == cfg.trial_iters for t, s in zip(starts["test"], starts["set"]))
    set_lengths = [t - s for s, t in zip(starts["set"], starts["test"][1:])]
    assert set_lengths == [min(cfg.set_iters * 2 ** j, cfg.max_backoff) for j in range(len(set_lengths))]
    assert set_lengths[-1] == cfg.max_backoff and len(set_lengths) >= 6
    assert stats["speculating_share"] < 0.03


def test_uniform_width_verify_charges_the_deepest_chain_for_widening_the_batch():
    """SGLang verifies every request to the batch's deepest chain (the cut rows still run): the one
    request that deepens the batch pays for the rows it adds to the others, plain requests stay at 1,
    and rows up to the second-deepest chain are shared."""
    model = MoECostModel(SHAPE)
    s1, s3 = SpecConfig.parse("1x1x2"), SpecConfig.parse("3x1x4")

    def record(configs, uniform, wall=0.3):
        rows = max(c.steps for c in configs) + 1
        obs = [RequestObservation(f"r{k}", c, 0, c.steps + 1, 200, rows if uniform else 0)
               for k, c in enumerate(configs)]
        return IterationRecord(wall, obs, [6] * SHAPE.num_layers)

    for wall in (0.30, 0.34, 0.31, 0.36, 0.33, 0.35) * 10:   # enough samples for the fit
        model.observe(record([s3, PLAIN, s1, PLAIN], True, wall))
    batch = [s3, PLAIN, PLAIN, PLAIN]
    ragged, uniform = record(batch, False), record(batch, True)
    model.observe(ragged)
    alone_ragged = model.relative_costs(ragged, "allocated")
    model.observe(uniform)
    alone_uniform = model.relative_costs(uniform, "allocated")
    assert alone_uniform[1:] == [1.0, 1.0, 1.0] == alone_ragged[1:]
    assert alone_uniform[0] > alone_ragged[0] > 1.0           # the widening is charged to the s3 request
    tied = record([s3, s3, PLAIN, PLAIN], True)
    model.observe(tied)
    a, b, *plain = model.relative_costs(tied, "allocated")
    assert a == pytest.approx(b) and plain == [1.0, 1.0]      # two deepest: nobody alone widens the batch
    assert model.predict(uniform) > model.predict(ragged)     # the cut rows' FLOPs are in the prediction


def test_uniform_cost_is_what_a_configuration_costs_once_the_whole_batch_runs_it():
    """batch_cost "uniform": a request that speculates alone among plain ones is charged T_c / T0,
    the batch all on its configuration over the batch all plain, not the draft steps the whole batch
    would share; in a batch of one configuration that is what "allocated" charges too."""
    model = MoECostModel(SHAPE)
    s3 = SpecConfig.parse("3x1x4")

    def record(configs, wall=0.3):
        obs = [RequestObservation(f"r{k}", c, 0, c.draft_tokens, 200) for k, c in enumerate(configs)]
        return IterationRecord(wall, obs, [6] * SHAPE.num_layers, 0.2 * wall * any(c.steps for c in configs))

    for wall in (0.30, 0.34, 0.31, 0.36, 0.33, 0.35) * 10:
        model.observe(record([s3, PLAIN, s3, PLAIN], wall))
    together = record([s3] * 4)
    lone = record([s3] + [PLAIN] * 3)
    model.observe(together)
    both = model.relative_costs(together, "uniform")
    assert both == pytest.approx(model.relative_costs(together, "allocated"))
    assert both[0] == pytest.approx(model.predict(together) / model.predict(record([PLAIN] * 4)))
    model.observe(lone)
    uniform, allocated = model.relative_costs(lone, "uniform"), model.relative_costs(lone, "allocated")
    assert uniform == pytest.approx([model.predict(together) / model.predict(record([PLAIN] * 4)), 1.0, 1.0, 1.0])
    assert 1.0 < uniform[0] < allocated[0]   # alone it would carry the batch's shared draft steps


@pytest.mark.parametrize("pays", [True, False])
def test_new_requests_start_from_what_earlier_requests_measured(pays):
    """After enough measured utilities, a new request skips its first test: it sets the rung the
    population found best (or plain where nothing paid), then tests as usual."""
    ctl = controller(prior_samples=2)
    cfg = ctl.config
    accepted = (lambda c: PAYING[c.label()][0] if c.speculative else 0) if pays else (lambda c: 0)
    cost = (lambda c: PAYING[c.label()][1] if c.speculative else 1.0) if pays else \
        (lambda c: 1.3 if c.speculative else 1.0)
    first = run_batch1(ctl, "r0", 60, accepted, cost)
    phases = [p for _, p in ctl.request_stats("r0")["phase_history"]]
    tests_ended = sum(a == "test" and b == "set" for a, b in zip(phases, phases[1:]))
    ctl.finish_request("r0")
    assert first[cfg.warmup_iters].speculative                     # the first request tests
    later = run_batch1(ctl, "r1", 300, accepted, cost)
    stats = ctl.request_stats("r1")
    assert [p for _, p in stats["phase_history"][:3]] == ["base", "set", "test"]
    best = max(PAYING, key=lambda k: (PAYING[k][0] + 1) / PAYING[k][1]) if pays else "plain"
    assert later[cfg.warmup_iters].label() == best
    started = stats["phase_history"][0][0]   # controller iterations: r1 began after r0's 60
    # plain: the population's back-off, doubled by each of r0's tests (all ended plain)
    set_len = cfg.set_iters if pays else cfg.set_iters * 2 ** tests_ended
    assert pays or tests_ended == 2
    assert stats["phase_history"][2][0] - started == cfg.warmup_iters + set_len


def test_population_back_off_spares_short_requests_and_keeps_testing():
    """Short requests one after another where speculation loses: once tests keep ending plain, only
    one new request in max_backoff / set_iters still tests, and the others never speculate. When
    speculation starts to pay, that request's test finds it, and new requests speculate again."""
    ctl = controller(prior_samples=2)
    cfg = ctl.config
    losing = (lambda c: 0, lambda c: 1.3 if c.speculative else 1.0)
    paying = (lambda c: PAYING[c.label()][0] if c.speculative else 0,
              lambda c: PAYING[c.label()][1] if c.speculative else 1.0)

    def short_request(k, trace):
        ran = run_batch1(ctl, f"r{k}", 30, *trace)
        ctl.finish_request(f"r{k}")
        return any(c.speculative for c in ran)

    speculated = [short_request(k, losing) for k in range(64)]
    assert speculated[0]                              # the first request tests, twice over its 30 iterations
    late = speculated[32:]
    assert sum(late) == len(late) * cfg.set_iters // cfg.max_backoff   # 1 in 16 explores
    after = [short_request(64 + k, paying) for k in range(40)]
    assert all(after[-8:]), after


def test_population_back_off_on_a_paying_load_changes_nothing():
    """Where tests keep finding a paying rung, new requests start on it as before (back-off 0)."""
    ctl = controller(prior_samples=2)
    paying = (lambda c: PAYING[c.label()][0] if c.speculative else 0,
              lambda c: PAYING[c.label()][1] if c.speculative else 1.0)
    for k in range(20):
        ran = run_batch1(ctl, f"r{k}", 30, *paying)
        ctl.finish_request(f"r{k}")
        if k >= 2:
            assert ran[ctl.config.warmup_iters].speculative


def test_a_losing_set_phase_ends_after_a_trial():
    """The population says s3k1n4 pays; a request for which drafts never match sets it from the
    prior, sees utility below 1 after trial_iters iterations and tests instead of finishing the set
    phase. A paying request's set phases run their full length."""
    ctl = controller(prior_samples=2)
    cfg = ctl.config
    paying = (lambda c: PAYING[c.label()][0] if c.speculative else 0,
              lambda c: PAYING[c.label()][1] if c.speculative else 1.0)
    run_batch1(ctl, "r0", 60, *paying)
    ctl.finish_request("r0")
    run_batch1(ctl, "r1", 40, lambda c: 0, paying[1])
    phases = ctl.request_stats("r1")["phase_history"]
    assert [p for _, p in phases[:3]] == ["base", "set", "test"]
    assert phases[2][0] - phases[1][0] == cfg.trial_iters
    ctl.finish_request("r1")
    run_batch1(ctl, "r2", 200, *paying)
    phases = ctl.request_stats("r2")["phase_history"]
    set_lengths = [b - a for (a, p), (b, _) in zip(phases, phases[1:]) if p == "set"]
    assert set_lengths and all(n == cfg.set_iters for n in set_lengths)


def test_plain_ahead_promises_only_what_the_next_decisions_keep():
    ctl = controller(prior_samples=0)
    cfg = ctl.config
    assert not ctl.plain_ahead(["r"], pending=1)   # unknown: it may start anywhere
    run_batch1(ctl, "r", cfg.warmup_iters - 2, lambda c: 0, lambda c: 1.0)
    assert ctl.plain_ahead(["r"], pending=1) and not ctl.plain_ahead(["r"], pending=2)   # BASE ends, then TEST
    run_batch1(ctl, "r", 2 + cfg.trial_iters, lambda c: 0, lambda c: 1.3 if c.speculative else 1.0)
    assert ctl.decide(["r"])["r"] == PLAIN   # the trial lost: a plain set phase of set_iters
    assert ctl.plain_ahead(["r"], pending=cfg.set_iters - 1) and not ctl.plain_ahead(["r"], pending=cfg.set_iters)
    run_batch1(ctl, "r", cfg.set_iters, lambda c: 0, lambda c: 1.0)
    assert ctl.decide(["r"])["r"].speculative and not ctl.plain_ahead(["r"], pending=1)   # re-testing


def test_without_a_prior_every_request_tests():
    ctl = controller(prior_samples=0)
    for rid in ("r0", "r1"):
        ran = run_batch1(ctl, rid, 40, lambda c: 0, lambda c: 1.3 if c.speculative else 1.0)
        assert ran[ctl.config.warmup_iters].speculative
        ctl.finish_request(rid)


def test_plain_alone_ladder_never_speculates():
    """`--cascade-candidates 0`: Cascade installed but held at plain (what its plain tier costs)."""
    ctl = controller(candidates="0")
    assert [c.label() for c in ctl.config.ladder] == ["plain"]
    ran = run_batch1(ctl, "r", 600, lambda c: 3, lambda c: 1.0)
    assert all(c == PLAIN for c in ran)
    assert ctl.request_stats("r")["utility"] == {}


# per rung: accepted drafts and iteration cost relative to plain; U = (a + 1) / cost
PAYING = {"s1k1n2": (1, 1.3), "s2k1n3": (2, 1.5), "s3k1n4": (3, 1.7), "s4k2n6": (3, 2.0), "s5k2n8": (4, 2.4)}


def test_paying_speculation_settles_on_best_config():
    utilities = {k: (a + 1) / c for k, (a, c) in PAYING.items()}
    best = max(utilities, key=utilities.get)
    assert best == "s3k1n4"
    ctl = controller()
    rng = random.Random(0)
    ran = run_batch1(ctl, "r", 600, lambda c: PAYING[c.label()][0] if c.speculative else 0,
                     lambda c: PAYING[c.label()][1] if c.speculative else 1.0, rng)
    stats = ctl.request_stats("r")
    assert stats["utility"][best] == pytest.approx(utilities[best], rel=0.05)
    first_set = next(it for it, phase in stats["phase_history"] if phase == "set")
    assert ran[first_set].label() == best
    later = [c.label() for c in ran[first_set:]]   # each cycle: 16 set + 4 at best + 4 one rung up
    assert later.count(best) / len(later) > 0.75


def test_adapts_when_acceptance_changes():
    ctl = controller()
    cost = lambda c: 1 + 0.1 * c.draft_tokens if c.speculative else 1.0  # noqa: E731
    phase = {"accepted": lambda c: c.steps}
    ran = run_batch1(ctl, "r", 400, lambda c: phase["accepted"](c), cost)
    assert ran[-1].speculative
    phase["accepted"] = lambda c: 0           # the drafter stops matching: plain after the next test
    changed = ctl.iteration
    run_batch1(ctl, "r", 50, lambda c: phase["accepted"](c), cost)
    went_plain = [it for it, label in ctl.request_stats("r")["config_history"] if it > changed and label == "plain"]
    cfg = ctl.config
    assert went_plain and went_plain[0] <= changed + cfg.set_iters + cfg.max_trials * cfg.trial_iters
    phase["accepted"] = lambda c: c.steps     # and it matches again: speculation resumes after back-off
    ran = [c for _ in range(600) for c in run_batch1(ctl, "r", 1, lambda c: phase["accepted"](c), cost)]
    assert ran[-1].speculative and sum(c.speculative for c in ran[-200:]) > 150


class MoEWorld:
    """Ground truth for batches: wall time from bytes moved at 20 GB/s (+2 ms), experts routed at random."""

    def __init__(self, shape, seed=0):
        self.s, self.rng = shape, random.Random(seed)

    def iteration(self, ctl, accepted_of):
        rids = list(accepted_of)
        cfgs = ctl.decide(rids)
        s = self.s
        touched = [set() for _ in range(s.num_layers)]
        obs = []
        for rid in rids:
            c = cfgs[rid]
            for layer in touched:
                for _ in range(c.draft_tokens):
                    layer.update(self.rng.sample(range(s.num_experts), s.top_k))
            obs.append(RequestObservation(rid, c, min(accepted_of[rid], c.steps), c.draft_tokens, 200))
        distinct = [len(t) for t in touched]
        nbytes = s.bytes_per_param * (s.dense_params + sum(distinct) * s.expert_params
                                      + s.draft_params * max(c.steps for c in cfgs.values()))
        nbytes += sum(o.seq_len for o in obs) * s.kv_bytes_per_token
        ctl.observe(IterationRecord(0.002 + nbytes / 20e9, obs, distinct))
        return cfgs


def test_batch_two_speculates_only_where_it_pays():
    # In this world (allocated cost), "good" gains on every rung (true U 1.5-2.6) and "bad" on none.
    ctl = controller()
    world = MoEWorld(SHAPE)
    history = [world.iteration(ctl, {"good": 99, "bad": 0}) for _ in range(300)]
    for rid, want_spec in (("good", True), ("bad", False)):
        tail = [h[rid].speculative for h in history[150:]]
        share = sum(tail) / len(tail)
        assert (share > 0.8) if want_spec else (share < 0.15), (rid, share, ctl.request_stats(rid))
    assert ctl.request_stats("good")["utility"]["s1k1n2"] > 1 > ctl.request_stats("bad")["utility"]["s1k1n2"]
    assert ctl.summary()["cost_model"]["fit_error"] < 0.1


def test_cost_model_fits_routing_and_marginals():
    model = MoECostModel(SHAPE)
    world = MoEWorld(SHAPE, seed=1)

    class Recorder:  # lets MoEWorld drive the model with fixed mixed configs
        def __init__(self):
            self.i = 0

        def decide(self, rids):
            self.i += 1
            return {r: SpecConfig.parse(["0", "1x1x2", "3x1x4", "5x2x8"][(self.i + k) % 4]) for k, r in enumerate(rids)}

        def observe(self, record):
            self.record = record
            model.observe(record)

    rec = Recorder()
    for _ in range(200):
        world.iteration(rec, {f"r{k}": 1 for k in range(4)})
    assert model.eta == pytest.approx(1.0, abs=0.15)        # the world routes independently
    assert abs(model.predict(rec.record) - rec.record.wall_time_s) / rec.record.wall_time_s < 0.05
    costs = zip(rec.record.requests, model.relative_costs(rec.record, "allocated"), model.relative_costs(rec.record, "marginal"))
    for obs, allocated, marginal in costs:
        if obs.tokens_verified == 1:
            assert allocated == pytest.approx(1.0) and marginal == pytest.approx(1.0)
        else:
            assert 1.0 < allocated < marginal   # sharing the fixed cost dilutes the ratio


settings_kw = dict(max_examples=60, deadline=None)


@settings(**settings_kw)
@given(seed=st.integers(0, 2 ** 32 - 1), trial_iters=st.integers(1, 4), max_trials=st.integers(1, 4),
       set_iters=st.integers(1, 8), backoff_mult=st.integers(1, 8), warmup=st.integers(0, 3),
       refresh=st.integers(1, 50), tol=st.floats(0, 0.5), batch_cost=st.sampled_from(BATCH_COSTS))
def test_state_machine_properties(seed, trial_iters, max_trials, set_iters, backoff_mult, warmup, refresh, tol,
                                  batch_cost):
    cfg = CascadeConfig(trial_iters=trial_iters, max_trials=max_trials, set_iters=set_iters,
                        max_backoff=set_iters * backoff_mult, warmup_iters=warmup, base_refresh=refresh,
                        stop_tolerance=tol, batch_cost=batch_cost)
    ctl = CascadeController(cfg, MoECostModel(SHAPE))
    rng = random.Random(seed)
    pool = [f"r{i}" for i in range(5)]
    prev, in_test, since_test = {}, {}, {}
    promised = set()   # requests plain_ahead() said stay plain at the next decision
    for _ in range(300):
        running = [r for r in pool if rng.random() < 0.7] or pool[:1]
        if rng.random() < 0.3:   # stretches at batch 1 exercise t_base and its refresh
            running = running[:1]
        if rng.random() < 0.02:
            gone = rng.choice(pool)
            ctl.finish_request(gone)
            for d in (prev, in_test, since_test):
                d.pop(gone, None)
            running = [r for r in running if r != gone] or [r for r in pool if r != gone][:1]
        cfgs = ctl.decide(running)
        assert set(cfgs) == set(running) and all(c in cfg.ladder for c in cfgs.values())
        assert all(cfgs[r] == PLAIN for r in promised & set(running))
        promised = set(running) if ctl.plain_ahead(running, pending=1) else set()
        obs = [RequestObservation(r, c, rng.randint(0, c.steps), c.draft_tokens, rng.randint(1, 4000))
               for r, c in cfgs.items()]
        ctl.observe(IterationRecord(rng.uniform(0.005, 0.1), obs, [rng.randint(1, 16) for _ in range(30)]))
        for r in running:
            phase = Phase(ctl.request_stats(r)["phase"])
            if r in prev and phase is not prev[r]:
                assert phase in ALLOWED_TRANSITIONS[prev[r]], (prev[r], phase)
            prev[r] = phase
            in_test[r] = in_test.get(r, 0) + 1 if phase is Phase.TEST else 0
            assert in_test[r] <= max_trials * trial_iters
            since_test[r] = 0 if phase is Phase.TEST else since_test.get(r, 0) + 1
            # a set phase (at most max_backoff) and a t_base refresh between tests; before a request's
            # first test, also its warm-up (then its set phase is the prior's, set_iters long)
            assert since_test[r] <= cfg.max_backoff + 2 * warmup + 1
    summary = ctl.summary()
    assert 0 <= summary["speculating_share"] <= 1 and summary["iterations"] == 300
    json.dumps(summary), json.dumps([ctl.request_stats(r) for r in prev])


def test_import_pulls_no_heavy_modules():
    code = ("import sys, json, sglang_cascade.controller as c; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'sglang'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"


def parse(argv):
    parser = argparse.ArgumentParser()
    CascadeConfig.add_cli_args(parser)
    return CascadeConfig.from_cli_args(parser.parse_args(argv))


def test_flags_round_trip_and_defaults():
    assert parse([]) == CascadeConfig()
    custom = CascadeConfig(candidates="2x1x3,1x1x2,4x2x6", trial_iters=2, max_trials=3, set_iters=8,
                           max_backoff=64, base_refresh=50, warmup_iters=0, utility_threshold=1.05,
                           stop_tolerance=0.2, batch_cost="marginal")
    assert custom.ladder == (PLAIN, SpecConfig(1, 1, 2), SpecConfig(2, 1, 3), SpecConfig(4, 2, 6))
    assert parse(custom.to_cli_args()) == custom
    assert CascadeConfig.from_cli_args(argparse.Namespace(cascade_set_iters=32)).set_iters == 32


def test_flags_table_lists_every_flag():
    parser = argparse.ArgumentParser()
    CascadeConfig.add_cli_args(parser)
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest.startswith("cascade_")]
    table = (Path(__file__).parents[1] / "sglang_cascade" / "controller" / "FLAGS.md").read_text()
    assert len(flags) == 11 and all(f"`{flag}`" in table for flag in flags)


@pytest.mark.parametrize("argv, flag", [
    (["--cascade-candidates", "3x9x1"], "--cascade-candidates"),
    (["--cascade-candidates", "1x1x2,abc"], "--cascade-candidates"),
    (["--cascade-candidates", "1x1x2,1x1x2"], "--cascade-candidates"),
    (["--cascade-trial-iters", "-1"], "--cascade-trial-iters"),
    (["--cascade-max-trials", "0"], "--cascade-max-trials"),
    (["--cascade-warmup-iters", "-3"], "--cascade-warmup-iters"),
    (["--cascade-set-iters", "32", "--cascade-max-backoff", "16"], "--cascade-max-backoff"),
    (["--cascade-utility-threshold", "0"], "--cascade-utility-threshold"),
    (["--cascade-stop-tolerance", "1.5"], "--cascade-stop-tolerance"),
    (["--cascade-batch-cost", "average"], "--cascade-batch-cost"),
])
def test_flag_errors_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        parse(argv)


def test_a_request_first_decided_in_a_batch_skips_the_plain_warm_up():
    """Warm-up measures t_base by the clock, which only a batch of one can: a request first decided in a
    batch starts at once (its first test), one first decided alone warms up plain first."""
    ctl = controller(prior_samples=0)
    first = ctl.decide(["alone"])["alone"]
    joined = ctl.decide(["alone", "late"])["late"]
    assert first == PLAIN and ctl.request_stats("alone")["phase"] == "base"
    assert joined.speculative and ctl.request_stats("late")["phase"] == "test"
    assert ctl.request_stats("late")["phase_history"] == [[0, "test"]]   # no warm-up in its history
