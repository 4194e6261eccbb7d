"""The evals' intervals and verdicts (evals/precision.py) on synthetic requests: known ratios, pairing,
drift cancelled by mirrored rounds, the oracle as the worst-placed baseline, and the +-3% rule."""

import random

import pytest

from evals import precision
from evals.precision import Interval


def _round(speeds: dict[str, float], tokens: int = 100) -> dict:
    """request id -> (tokens, seconds) for requests served at the given tokens/s."""
    return {rid: (tokens, tokens / s) for rid, s in speeds.items()}


def _requests(n, seed, spread=0.3):
    rng = random.Random(seed)
    return {f"r{i}": 10 * (1 + spread * (rng.random() - 0.5)) for i in range(n)}


def test_a_uniform_speed_up_is_found_exactly():
    base = _requests(20, 0)
    fast = {rid: 1.2 * s for rid, s in base.items()}
    got = precision.ratio([_round(fast), _round(fast)], [[_round(base), _round(base)]])
    assert got.estimate == pytest.approx(1.2) and got.low == pytest.approx(1.2) and got.high == pytest.approx(1.2)
    assert got.per_round == pytest.approx((1.2, 1.2)) and got.verdict(1.10) == "met"


def test_pairing_removes_the_prompt_spread():
    """Prompts of very different speeds, each 5% faster in the mode +-2%: unpaired that spread would swamp
    the ratio; paired, the interval is a few percent wide and holds 1.05."""
    rng = random.Random(1)
    base = _requests(40, 2, spread=1.5)
    mode = {rid: s * 1.05 * (1 + 0.04 * (rng.random() - 0.5)) for rid, s in base.items()}
    got = precision.ratio([_round(mode)], [[_round(base)]], seed=3)
    assert got.low < 1.05 < got.high and got.high - got.low < 0.02 and got.resolved


def test_mirrored_rounds_cancel_a_linear_drift():
    """The machine slows 10% per slot; round 0 measures plain first, round 1 last: the rounds' ratios
    are biased in opposite directions and their median (two rounds: the mean) is the true 1.0."""
    base = _requests(30, 4)
    slow = {rid: s * 0.9 for rid, s in base.items()}
    got = precision.ratio([_round(slow), _round(base)], [[_round(base), _round(slow)]])
    assert got.per_round == pytest.approx((0.9, 1 / 0.9))
    assert got.estimate == pytest.approx((0.9 + 1 / 0.9) / 2)


def test_oracle_is_the_worst_placed_baseline_and_requests_pair_by_id():
    base = _requests(20, 5)
    static = {rid: s * 1.3 for rid, s in base.items()}
    mode = {rid: s * 1.25 for rid, s in base.items()}
    errored = dict(list(mode.items())[1:])  # one request missing from the mode: left out, not mispaired
    got = precision.ratio([_round(errored)], [[_round(base)], [_round(static)]])
    assert got.estimate == pytest.approx(1.25 / 1.3) and got.baseline == 1
    assert precision.ratio([_round(errored)], [[_round(base)]]).estimate == pytest.approx(1.25)


def test_intervals_are_seeded_and_wider_with_fewer_requests():
    rng = random.Random(6)
    base = _requests(200, 7)
    mode = {rid: s * (1 + 0.4 * (rng.random() - 0.5)) for rid, s in base.items()}
    few = dict(list(mode.items())[:10])
    a = precision.ratio([_round(few)], [[_round(base)]], seed=1)
    assert a == precision.ratio([_round(few)], [[_round(base)]], seed=1)
    assert a != precision.ratio([_round(few)], [[_round(base)]], seed=2)
    b = precision.ratio([_round(mode)], [[_round(base)]], seed=1)
    assert b.high - b.low < (a.high - a.low) / 2


def test_verdicts():
    assert Interval(1.00, 0.98, 1.02, ()).verdict(0.97) == "met"
    assert Interval(0.98, 0.96, 1.00, ()).verdict(0.97) == "missed"      # lower end below the goal
    assert Interval(0.90, 0.88, 0.92, ()).verdict(0.97) == "missed"
    assert Interval(1.20, 1.10, 1.30, ()).verdict(0.97) == "unresolved"  # wider than +-3%, even far above
    assert Interval(1.00, 0.969, 1.00, ()).verdict(0.97) == "unresolved"
    assert Interval(1.00, 1.00, 1.00, (), requests=precision.MIN_REQUESTS - 1).verdict(0.97) == "unresolved"


def test_a_handful_of_requests_never_resolves():
    """One request per round gives a zero-width bootstrap interval: it must not pass for a precise one."""
    one = precision.ratio([_round({"r0": 12.0})] * 2, [[_round({"r0": 10.0})] * 2])
    assert one.low == one.high == pytest.approx(1.2) and one.requests == 1 and one.verdict(0.97) == "unresolved"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        precision.ratio([_round({"a": 1.0})], [[]])
    with pytest.raises(ValueError, match="round 0: no request"):
        precision.ratio([_round({"a": 1.0})], [[_round({"b": 1.0})]])


def test_spread():
    assert precision.spread([]) == {"median": None, "p10": None, "p90": None}
    got = precision.spread(list(range(1, 102)))
    assert got == {"median": 51.0, "p10": 11.0, "p90": 91.0}
