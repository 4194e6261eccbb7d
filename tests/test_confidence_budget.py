"""ConfidenceBudgetPolicy: the threshold cut, the global verify budget, plain when the draft is unsure,
its calibration, and that it stays a torch-free SpecPolicy."""

import subprocess
import sys

from sglang_cascade.controller import PLAIN, IterationRecord, RequestObservation, SpecConfig, SpecPolicy
from sglang_cascade.controller.confidence_budget import ConfidenceBudgetPolicy


def flat(requests, tokens):   # verify tokens are free: only the threshold limits
    return 1.0


def knee(limit):
    """Step cost flat up to `limit` tokens, then steep (the saturated GPU)."""
    return lambda requests, tokens: 1.0 if tokens <= limit else 1.0 + (tokens - limit)


def test_threshold_cut_per_request():
    pol = ConfidenceBudgetPolicy(flat, max_steps=5, threshold=0.2)
    # survival: 0.9, 0.45, 0.225, 0.1125 -> three slots clear 0.2
    assert pol.draft_lengths({"a": [0.9, 0.5, 0.5, 0.5, 0.5]}) == {"a": 3}


def test_budget_respected_and_goes_to_the_confident_request():
    pol = ConfidenceBudgetPolicy(knee(4), max_steps=4, threshold=0.0)
    lengths = pol.draft_lengths({"sure": [0.95] * 4, "unsure": [0.6] * 4})
    assert sum(lengths.values()) + 2 <= 4       # 2 roots + admitted drafts within the 4-token budget
    assert lengths == {"sure": 2, "unsure": 0}  # 0.95, 0.90 outrank the unsure request's 0.6
    assert pol.last_budget == 2


def test_plain_when_confidence_is_low():
    pol = ConfidenceBudgetPolicy(flat, max_steps=7, threshold=0.3)
    assert pol.draft_lengths({"a": [0.2] * 7, "b": [0.1] * 7}) == {"a": 0, "b": 0}


def test_a_slot_that_does_not_pay_its_cost_is_not_verified():
    # each extra token costs 10% of a step: a draft accepted with probability 0.05 loses throughput
    pol = ConfidenceBudgetPolicy(lambda n, t: 1.0 + 0.1 * (t - n), max_steps=3, threshold=0.0)
    assert pol.draft_lengths({"a": [0.9, 0.9, 0.05]}) == {"a": 2}


def test_calibration_learns_from_rejections():
    pol = ConfidenceBudgetPolicy(flat, max_steps=3, threshold=0.0, calibration_ema=0.5)
    for i in range(20):
        pol.draft_lengths({"a": [0.9, 0.9, 0.9]})
        pol.observe(IterationRecord(1.0, [RequestObservation("a", SpecConfig(3), 0, 4, 10 + i)]))
    assert pol.scale[0] < 0.1 and pol.scale[1] == 1.0   # the first draft is always rejected, the second never reached
    assert pol.survival([0.9, 0.9, 0.9])[0] < 0.1


def test_one_early_rejection_does_not_stop_verification():
    """The calibration starts calibrated: a first verify that rejects every draft lowers the scale, but the
    next iteration still verifies drafts (from zeroed EMAs the scale fell to 0 and stayed there)."""
    pol = ConfidenceBudgetPolicy(flat, max_steps=3, threshold=0.05)
    assert pol.draft_lengths({"a": [0.9, 0.9, 0.9]}) == {"a": 3}
    pol.observe(IterationRecord(1.0, [RequestObservation("a", SpecConfig(3), 0, 4, 10)]))
    assert 0.5 < pol.scale[0] < 1.0
    assert pol.draft_lengths({"a": [0.9, 0.9, 0.9]})["a"] > 0


def test_spec_policy_interface():
    pol = ConfidenceBudgetPolicy(flat, max_steps=4)
    assert isinstance(pol, SpecPolicy)
    assert pol.decide(["a", "b"]) == {"a": SpecConfig(4), "b": SpecConfig(4)}
    assert not pol.plain_ahead(["a"], 0)
    assert ConfidenceBudgetPolicy(flat, max_steps=0).decide(["a"]) == {"a": PLAIN}
    pol.finish_request("a")
    assert pol.summary()["requests_finished"] == 1


def test_imports_without_torch():
    code = ("import sys; import sglang_cascade.controller.confidence_budget; "
            "assert 'torch' not in sys.modules and 'sglang' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
