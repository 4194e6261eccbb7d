"""ConfidenceBudgetPolicy: per-request draft lengths from the draft's own confidence under one global
verify budget per iteration, modelled on vLLM's adaptive verification (vLLM 0.32, "Adaptive
Verification": every (request, position) draft slot is scored by its survival probability, the running
product of per-position confidences; the best slots over the whole batch are admitted until a budget
chosen from step costs profiled at startup is spent).

Why here: it is the baseline users can pick today that, like Cascade, varies speculation per request
and with load; it prices verify tokens by measured step cost but not the distinct experts a batch
loads. Written against SpecPolicy so that any engine with a hook after drafting can run it; the replay
(evals/replay) does, the portable engine and the SGLang plugin do not yet call draft_lengths().

How a server drives it (one iteration):

    cfgs = policy.decide(rids)                 # every request drafts the full chain, SpecConfig(max_steps)
    probs = {rid: [p_1, ..., p_K] ...}         # draft probability of each drafted chain token, in order
    k = policy.draft_lengths(probs)            # per request: verify only the first k[rid] drafts (0 = plain)
    ... verify the cut chains ...
    policy.observe(IterationRecord(...))       # each request's config = SpecConfig(k[rid]) (PLAIN if 0)

Differences from vLLM, on purpose: the EAGLE head has no trained confidence head, so a draft token's
probability is calibrated per position against what verification accepted (calibration, an
acceptance estimator like vLLM's EMA); a slot must also clear `threshold` to be verified at all.
Standard library only, like the rest of the controller package.
"""

from __future__ import annotations

from collections.abc import Callable

from .types import PLAIN, IterationRecord, SpecConfig


class ConfidenceBudgetPolicy:
    """step_cost(requests, tokens): seconds of one verify step of `requests` requests verifying `tokens`
    tokens in all (profiled at startup). Each iteration admits the best-scoring draft slots m that
    maximise (requests + expected accepted drafts) / step_cost(requests, requests + m).

    max_steps: chain length drafted for every request (vLLM's num_speculative_tokens, 7 in its post).
    threshold: a slot whose survival estimate is below it is never verified.
    calibration_ema: weight of the newest iteration in the per-position calibration.
    """

    name = "confidence-budget"

    def __init__(self, step_cost: Callable[[int, int], float], max_steps: int = 7, threshold: float = 0.05,
                 calibration_ema: float = 0.05):
        if max_steps < 0 or not 0 <= threshold < 1 or not 0 < calibration_ema <= 1:
            raise ValueError("ConfidenceBudgetPolicy: need max_steps >= 0, 0 <= threshold < 1, "
                             "0 < calibration_ema <= 1")
        self.step_cost, self.max_steps, self.threshold, self.ema = step_cost, max_steps, threshold, calibration_ema
        self.scale = [1.0] * max_steps         # per position: accepted / predicted conditional acceptance
        # EMAs behind the scale, both starting at 0.5 (calibrated): from 0, one early rejection would set a
        # position's scale to 0, and a position never verified again never learns again
        self._predicted = [0.5] * max_steps
        self._hit = [0.5] * max_steps
        self._conf: dict[str, list[float]] = {}
        self._running: set[str] = set()
        self.iteration = 0
        self._finished = 0
        self._verified = 0     # draft tokens verified, over all requests and iterations
        self._slots = 0        # draft tokens drafted
        self.last_budget = 0

    # -- SpecPolicy --------------------------------------------------------------------------------
    def add_request(self, rid: str) -> None:
        self._running.add(rid)

    def finish_request(self, rid: str) -> None:
        if rid in self._running:
            self._running.discard(rid)
            self._conf.pop(rid, None)
            self._finished += 1

    def decide(self, rids) -> dict[str, SpecConfig]:
        """The full chain for every request: the cut comes after drafting, in draft_lengths()."""
        config = SpecConfig(self.max_steps) if self.max_steps else PLAIN
        out = {}
        for rid in rids:
            self._running.add(rid)
            out[rid] = config
        return out

    def plain_ahead(self, rids, pending: int) -> bool:
        return self.max_steps == 0

    def survival(self, probs: list[float]) -> list[float]:
        """Calibrated probability that each of a chain's drafts is accepted (running product)."""
        out, s = [], 1.0
        for j, p in enumerate(probs[:self.max_steps]):
            s *= min(1.0, p * self.scale[j])
            out.append(s)
        return out

    def draft_lengths(self, confidences: dict[str, list[float]]) -> dict[str, int]:
        """Drafts to verify per request, from each request's draft probabilities along its chain."""
        slots = []   # (survival, position, rid): prefix-closed when taken best first
        for rid, probs in confidences.items():
            self._conf[rid] = list(probs[:self.max_steps])
            for j, s in enumerate(self.survival(probs)):
                if s < self.threshold:
                    break
                slots.append((s, -j, rid))
        slots.sort(reverse=True)
        n = len(confidences)
        best_m, best_rate, expected = 0, 0.0, float(n)
        if n:
            best_rate = n / self.step_cost(n, n)
            for m, (s, _, _) in enumerate(slots, 1):
                expected += s
                rate = expected / self.step_cost(n, n + m)
                if rate > best_rate:
                    best_m, best_rate = m, rate
        lengths = dict.fromkeys(confidences, 0)
        for _, _, rid in slots[:best_m]:
            lengths[rid] += 1
        self.last_budget = best_m
        return lengths

    def observe(self, record: IterationRecord) -> None:
        """Per-position calibration from what verification accepted of the confidences draft_lengths saw."""
        a = self.ema
        for obs in record.requests:
            probs = self._conf.get(obs.rid)
            k = obs.config.steps
            self._slots += self.max_steps
            self._verified += k
            if not probs or not k:
                continue
            for j in range(min(k, obs.accepted + 1)):   # positions reached: accepted, or the first rejected
                self._predicted[j] += a * (probs[j] - self._predicted[j])
                self._hit[j] += a * ((obs.accepted > j) - self._hit[j])
                if self._predicted[j] > 0:
                    self.scale[j] = self._hit[j] / self._predicted[j]
        self.iteration += 1

    def request_stats(self, rid: str) -> dict:
        if rid not in self._running:
            raise KeyError(rid)
        probs = self._conf.get(rid, [])
        return {"policy": self.name, "last_confidences": probs, "survival": self.survival(probs)}

    def summary(self) -> dict:
        return {"policy": self.name, "iterations": self.iteration, "requests_running": len(self._running),
                "requests_finished": self._finished, "max_steps": self.max_steps, "threshold": self.threshold,
                "calibration": list(self.scale), "last_budget": self.last_budget,
                "verified_share_of_drafted": self._verified / self._slots if self._slots else 0.0}
