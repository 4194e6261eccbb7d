"""Cascade controller bookkeeping against a straightforward per-iteration recount.

For speed the controller counts per stretch instead of per iteration, and never adds up plain
costs (state.observe_iteration, RequestState.close_stretch). This replays seeded batch traces and
recounts everything the obvious way: every stretch's utility, every request's iterations, and
the request-iterations per rung.
"""

import random

import pytest

from sglang_cascade.controller import (PLAIN, CascadeConfig, CascadeController, IterationRecord, MoECostModel,
                                       MoEShape, RequestObservation)

SHAPE = MoEShape(num_layers=30, hidden_size=576, num_experts=16, top_k=4, expert_params=3 * 576 * 96,
                 dense_params=70_000_000, kv_bytes_per_token=2 * 30 * 192 * 4, bytes_per_param=4,
                 draft_params=10_000_000)


@pytest.mark.parametrize("seed,knobs", [
    (0, {}),
    (1, {"batch_cost": "marginal", "warmup_iters": 0}),
    (2, {"trial_iters": 1, "max_trials": 2, "set_iters": 2, "max_backoff": 6}),
    (3, {"batch_cost": "allocated"}),
])
def test_accounting_matches_a_per_iteration_recount(seed, knobs):
    cfg = CascadeConfig(**knobs)
    ctl = CascadeController(cfg, MoECostModel(SHAPE))
    rng = random.Random(seed)
    pool = [f"r{i}" for i in range(24)]
    accept = {r: rng.random() for r in pool}
    seq = {r: rng.randint(1, 3000) for r in pool}
    stretch = {}                                   # rid -> [tokens, cost] of its current stretch
    iterations, spec_iterations = {}, {}           # per request, since it joined
    per_rung = {c.label(): 0 for c in cfg.ladder}  # over all requests, finished ones included
    utilities_checked = 0
    for it in range(400):
        if rng.random() < 0.05:   # one request finishes, a new one takes its place
            k = rng.randrange(len(pool))
            ctl.finish_request(pool[k])
            pool[k] = f"n{it}"
            accept[pool[k]], seq[pool[k]] = rng.random(), rng.randint(1, 3000)
        running = [r for r in pool if rng.random() < 0.8]
        if len(running) < 2:   # batch >= 2: every relative cost comes from the cost model
            running = pool[:2]
        cfgs = ctl.decide(running)
        before = {r: (ctl.request_stats(r)["phase"], cfgs[r].label()) for r in running}
        obs = []
        for r in running:
            c, a = cfgs[r], 0
            while a < c.steps and rng.random() < accept[r]:
                a += 1
            obs.append(RequestObservation(r, c, a, c.draft_tokens, seq[r]))
            seq[r] += a + 1
        if rng.random() < 0.1:   # a request the controller does not track counts in the batch only
            obs.append(RequestObservation("stranger", PLAIN, 0, 1, 100))
        record = IterationRecord(rng.uniform(0.01, 0.05), obs, [rng.randint(4, 16) for _ in range(30)])
        ctl.observe(record)
        rels = ctl.cost_model.relative_costs(record, cfg.batch_cost)
        for o, rel in zip(obs, rels):
            if o.rid == "stranger":
                continue
            spec = o.config.speculative
            tokens_cost = stretch.setdefault(o.rid, [0, 0.0])
            tokens_cost[0] += o.accepted + 1
            tokens_cost[1] += rel if spec else 1.0
            iterations[o.rid] = iterations.get(o.rid, 0) + 1
            spec_iterations[o.rid] = spec_iterations.get(o.rid, 0) + spec
            per_rung[o.config.label()] += 1
            stats = ctl.request_stats(o.rid)
            assert stats["iterations"] == iterations[o.rid]
            assert stats["speculating_share"] == pytest.approx(spec_iterations[o.rid] / iterations[o.rid])
            phase, label = before[o.rid]
            if (stats["phase"], stats["config"]) != (phase, label):   # every stretch ends in a change
                tokens, cost = stretch.pop(o.rid)
                if spec:   # test trials and speculative set phases record their utility
                    assert stats["utility"][label] == pytest.approx(tokens / cost, rel=1e-12)
                    utilities_checked += 1
        summary = ctl.summary()
        assert summary["request_iterations_per_config"] == per_rung
        total = sum(per_rung.values())
        assert summary["speculative_iteration_share"] == pytest.approx((total - per_rung["plain"]) / total)
    assert utilities_checked > 100


def test_decide_takes_any_iterable_of_rids():
    ctl = CascadeController(CascadeConfig(), MoECostModel(SHAPE))
    ctl.add_request("a")
    cfgs = ctl.decide(r for r in ("a", "b", "c"))   # b and c unknown: added, in order
    # first decided in a batch, all three skip the plain warm-up and test at once
    assert list(cfgs) == ["a", "b", "c"] and all(c.speculative for c in cfgs.values())
    assert ctl.summary()["requests_running"] == 3
