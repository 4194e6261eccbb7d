"""SpecSession, driven directly: the bookkeeping both engines share around a policy.

The policy here is a recording fake where the test is about what the session hands it (which rids,
which records); the real CascadeController where it is about what Cascade learns.
"""

from __future__ import annotations

from sglang_cascade.controller import (PLAIN, CascadeConfig, CascadeController, MoECostModel, MoEShape, SpecConfig,
                                       SpecPolicy)
from sglang_cascade.controller.session import SpecSession

CHAIN = SpecConfig.parse("3x1x4")
TREE = SpecConfig.parse("3x2x6")


class Recorder:
    """A SpecPolicy that gives every request `config` and remembers what it was told."""

    name = "recorder"

    def __init__(self, config: SpecConfig = CHAIN, ahead: bool = True):
        self.config, self.ahead = config, ahead
        self.added, self.finished, self.decided, self.records, self.asked = [], [], [], [], []

    def add_request(self, rid):
        self.added.append(rid)

    def finish_request(self, rid):
        self.finished.append(rid)

    def decide(self, rids):
        self.decided.append(list(rids))
        return {rid: self.config for rid in rids}

    def plain_ahead(self, rids, pending):
        self.asked.append((list(rids), pending))
        return self.ahead

    def observe(self, record):
        self.records.append(record)

    def request_stats(self, rid):
        return {"phase": "set", "utility": {"s3k1n4": 1.5}}

    def summary(self):
        return {}


def test_the_recorder_and_cascade_are_spec_policies():
    assert isinstance(Recorder(), SpecPolicy)
    assert isinstance(cascade(), SpecPolicy)


def test_a_pinned_request_runs_its_config_and_stays_out_of_the_policy():
    policy = Recorder()
    session = SpecSession(policy)
    session.add("pinned", pinned=TREE)
    session.add("free")
    configs = session.begin(["pinned", "free"], [10, 20])
    assert configs == [TREE, CHAIN]
    assert policy.added == ["free"] and policy.decided == [["free"]]
    record = session.complete([2, 1])
    # the pinned request's verify still counts in the batch the policy observes, under its own config
    assert policy.records == [record]
    assert [(o.rid, o.config, o.accepted, o.tokens_verified, o.seq_len) for o in record.requests] == \
        [("pinned", TREE, 2, 6, 10), ("free", CHAIN, 1, 4, 20)]
    assert session.snapshot("pinned") is None and session.snapshot("free")["phase"] == "set"
    assert session.figures["pinned"].drafts_accepted == 2


def test_without_a_policy_every_request_runs_the_default():
    session = SpecSession(None, CHAIN)
    assert session.begin(["a", "b"], [1, 1]) == [CHAIN, CHAIN]
    session.complete([3, 0])
    assert session.snapshot("a") is None and session.figures["a"].drafts_accepted == 3


def test_overlapped_iterations_complete_in_order_and_are_timed_once(monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 6.0]).__next__
    monkeypatch.setattr("sglang_cascade.controller.session.time.perf_counter", clock)
    policy = Recorder()
    session = SpecSession(policy)
    session.begin(["a"], [5], note="first")      # t = 0
    session.begin(["a", "b"], [9, 3], note="second")   # t = 1, before the first completes (overlap)
    assert session.oldest_note == "first"
    first = session.complete([3])               # t = 4
    assert session.oldest_note == "second"
    second = session.complete([1, 2])           # t = 6
    assert [o.rid for o in first.requests] == ["a"] and [o.rid for o in second.requests] == ["a", "b"]
    # the second iteration's time runs from the first's completion, not from its own begin
    assert (first.wall_time_s, second.wall_time_s) == (4.0, 2.0)
    assert session.complete([0]) is None and session.oldest_note is None


def test_figures_count_what_ran_on_the_requests_own_clock():
    policy = Recorder()
    session = SpecSession(policy)
    for config, accepted in [(PLAIN, 0), (CHAIN, 3), (CHAIN, 1), (TREE, 2), (PLAIN, 0)]:
        policy.config = config
        session.begin(["r"], [1])
        session.complete([accepted])
    snap = session.snapshot("r")
    assert snap["config_history"] == [[0, "plain"], [1, "s3k1n4"], [3, "s3k2n6"], [4, "plain"]]
    assert (snap["decode_iterations"], snap["speculative_iterations"]) == (5, 3)
    assert (snap["drafts_proposed"], snap["drafts_accepted"]) == (3 + 3 + 5, 6)
    assert snap["accepted_beyond_budget"] == 0 and snap["utility"] == {"s3k1n4": 1.5}


def test_a_warm_up_iteration_runs_plain_and_teaches_the_policy_nothing():
    policy = Recorder()
    session = SpecSession(policy)
    assert session.begin(["a", "b"], [1, 1], learn=False) == [PLAIN, PLAIN]
    assert not session.plain_ahead()     # nothing was decided: never skip on a warm-up
    record = session.complete([0, 0])
    assert policy.decided == [] and policy.records == [] and record is not None
    assert session.figures["a"].iterations == 1


def test_plain_ahead_asks_the_policy_only_for_an_all_plain_batch():
    policy = Recorder(config=PLAIN)
    told = []
    session = SpecSession(policy, broadcast=lambda obj: told.append(obj) or obj)
    session.begin(["a", "b"], [1, 1])
    assert session.plain_ahead()
    assert policy.asked == [(["a", "b"], 1)]   # pending: the iterations still open, this one included
    assert told[-1] is True                     # the answer goes through the ranks' broadcast
    policy.config = CHAIN
    session.begin(["a", "b"], [2, 2])
    assert not session.plain_ahead() and len(policy.asked) == 1


def test_the_log_line_has_one_format_and_the_adapters_extras():
    lines = []
    session = SpecSession(cascade(), log=lines.append)
    configs = session.begin(["a", "b"], [7, 8])   # first decided in a batch: both test at once
    session.complete([0, 1], distinct_experts=[3, 4], draft_s=0.25, extra={"steps": 0})
    line = lines[0]
    assert set(line) == {"t", "wall_s", "draft_s", "batch", "tokens", "rids", "configs", "tree_sizes", "accepted",
                         "seq_lens", "distinct_experts", "routing_eta", "steps"}
    assert (line["batch"], line["tokens"], line["rids"], line["configs"]) == (2, 3, ["a", "b"], ["s1k1n2"] * 2)
    assert line["tree_sizes"] == [c.draft_tokens for c in configs] == [2, 2]
    assert (line["distinct_experts"], line["draft_s"], line["steps"]) == ([3, 4], 0.25, 0)


def test_a_batch_that_does_not_match_is_dropped():
    policy = Recorder()
    session = SpecSession(policy)
    session.begin(["a", "b"], [1, 1])
    assert session.complete([1]) is None and policy.records == []
    assert session.figures["a"].iterations == 0


def test_finish_returns_the_last_snapshot_and_forgets():
    policy = Recorder()
    session = SpecSession(policy)
    session.begin(["a"], [1])
    session.complete([2])
    last = session.finish("a")
    assert last["drafts_accepted"] == 2 and policy.finished == ["a"]
    assert session.snapshot("a") is None and "a" not in session.figures
    assert session.finish("never-seen") is None


def test_cascade_learns_from_the_session_records():
    """Through the session the controller books each request's results to the rung it ran."""
    ctl = cascade()
    session = SpecSession(ctl)
    for _ in range(12):
        configs = session.begin(["r"], [50])
        session.complete([configs[0].steps])   # every draft accepted
    assert ctl.iteration == 12
    assert ctl.request_stats("r")["utility"], "the controller never measured a speculative rung"


def cascade() -> CascadeController:
    shape = MoEShape(num_layers=2, hidden_size=64, num_experts=8, top_k=2, expert_params=3 * 64 * 32,
                     dense_params=10_000, kv_bytes_per_token=512)
    return CascadeController(CascadeConfig(candidates="0,1x1x2,3x1x4", warmup_iters=1, trial_iters=2, set_iters=4,
                                           prior_samples=0), MoECostModel(shape))

