"""Per-request Cascade state machine: BASE -> TEST -> SET -> (BASE ->) TEST -> ...

BASE  plain iterations that measure the request's plain-decode cost t_base (at its start, and again
      when t_base is older than base_refresh iterations and the request runs alone).
TEST  trials of trial_iters iterations, one ladder rung each, at most max_trials: hill-climbing from
      the best speculative rung seen so far (rules in _after_trial).
SET   the winner for set_iters iterations; a plain winner runs set_iters * 2^j iterations, j counting
      consecutive plain set phases (back-off, capped at max_backoff), so a request that never profits
      re-tests ever more rarely but never stops testing.

Utility of a stretch of iterations: tokens emitted (accepted + 1 each) / sum of relative costs, a
relative cost being this iteration's cost over a plain iteration's (1 for plain, by definition).
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from .config import CascadeConfig
from .types import RequestObservation

HISTORY = 64   # transitions kept per request for request_stats(); bounded so state never grows


class Phase(str, Enum):
    BASE = "base"
    TEST = "test"
    SET = "set"


ALLOWED_TRANSITIONS = {Phase.BASE: {Phase.TEST}, Phase.TEST: {Phase.SET}, Phase.SET: {Phase.TEST, Phase.BASE}}


class RequestState:
    """One request's phase, current rung and utility estimates (indices into the config's ladder)."""

    __slots__ = ("cfg", "phase", "index", "left", "utility", "tokens", "cost", "t_base", "t_base_at",
                 "base_samples", "direction", "trials", "best", "best_utility",
                 "plain_set_len", "iterations", "spec_iterations", "tests", "config_history",
                 "phase_history")

    def __init__(self, cfg: CascadeConfig, now: int):
        self.cfg = cfg
        self.utility: list = [None] * len(cfg.ladder)   # latest measured utility per rung
        self.t_base = None          # seconds of a plain iteration alone, and when last measured
        self.t_base_at = -1
        self.base_samples = 0
        self.plain_set_len = cfg.set_iters
        self.iterations = self.spec_iterations = self.tests = 0
        self.config_history: deque = deque(maxlen=HISTORY)
        self.phase_history: deque = deque(maxlen=HISTORY)
        self.index = -1
        self.phase = None
        if cfg.warmup_iters:
            self._enter(Phase.BASE, 0, cfg.warmup_iters, now)
        else:
            self._start_test(now)

    def plain_time(self, now: int):
        """t_base if measured within the last 2 * base_refresh iterations, else None (stale)."""
        return self.t_base if now - self.t_base_at <= 2 * self.cfg.base_refresh else None

    def _enter(self, phase: Phase, index: int, length: int, now: int) -> None:
        if phase is not self.phase:
            self.phase_history.append((now, phase.value))
        if index != self.index:
            self.config_history.append((now, self.cfg.ladder[index].label()))
        self.phase, self.index, self.left = phase, index, length
        self.tokens, self.cost = 0, 0.0

    # -- transitions -----------------------------------------------------------------------------
    def observe(self, obs: RequestObservation, relative_cost: float, alone: bool, wall_time_s: float,
                now: int) -> None:
        """Account one iteration (`now` is its index) and move on when the stretch is over.

        relative_cost is ignored for plain iterations; alone says the request was the whole batch,
        so a plain iteration's wall time is its own plain cost t_base.
        """
        self.iterations += 1
        if self.index:
            self.spec_iterations += 1
            self.cost += relative_cost
        else:
            self.cost += 1.0
            if alone:
                self._plain_sample(wall_time_s, now)
        self.tokens += obs.accepted + 1
        self.left -= 1
        if self.left > 0:
            return
        nxt = now + 1
        if self.phase is Phase.BASE:
            self._start_test(nxt)
        elif self.phase is Phase.TEST:
            self._after_trial(self.tokens / self.cost, nxt)
        else:
            if self.index:
                self.utility[self.index] = self.tokens / self.cost
            if self.cfg.warmup_iters and alone and now - self.t_base_at >= self.cfg.base_refresh:
                self.base_samples = 0
                self._enter(Phase.BASE, 0, self.cfg.warmup_iters, nxt)
            else:
                self._start_test(nxt)

    def _plain_sample(self, wall_time_s: float, now: int) -> None:
        """BASE averages its samples afresh; other plain iterations alone nudge t_base (EMA 0.25)."""
        if self.phase is Phase.BASE or self.t_base is None:
            self.base_samples += 1
            prev = self.t_base if self.base_samples > 1 else 0.0
            self.t_base = prev + (wall_time_s - prev) / self.base_samples
        else:
            self.t_base += 0.25 * (wall_time_s - self.t_base)
        self.t_base_at = now

    def _start_test(self, now: int) -> None:
        """First trial: the best speculative rung measured so far, else the smallest one."""
        known = [(u, i) for i, u in enumerate(self.utility) if i and u is not None]
        start = max(known)[1] if known else 1
        self.direction, self.trials = 1, 0
        self.best, self.best_utility = 0, 0.0
        self.tests += 1
        self._enter(Phase.TEST, start, self.cfg.trial_iters, now)

    def _after_trial(self, u: float, now: int) -> None:
        """Hill-climbing step, the paper's rules.

        From the start rung, climb while U rises by more than stop_tolerance; stop on a plateau
        (within tolerance), once U fell (a maximum was passed), at the ladder's top, or after
        max_trials. If the start rung does not beat utility_threshold, descend instead, towards plain.
        Then set the best rung if its U > utility_threshold, else plain. Going down from a good
        start is left to the next test: it starts from the best latest estimate, and a rung whose
        utility fell is no longer that.
        """
        cfg, i = self.cfg, self.index
        self.utility[i] = u
        self.trials += 1
        prev_best = self.best_utility
        if u > self.best_utility:
            self.best, self.best_utility = i, u
        if self.trials == 1:
            self.direction = 1 if u > cfg.utility_threshold else -1
            more = True
        else:   # still looking for a paying rung (descending), or still climbing
            more = self.best_utility <= cfg.utility_threshold or u > prev_best * (1 + cfg.stop_tolerance)
        nxt = i + self.direction
        if not more or nxt < 1 or nxt >= len(cfg.ladder) or self.trials >= cfg.max_trials:
            self._start_set(now)
        else:
            self._enter(Phase.TEST, nxt, cfg.trial_iters, now)

    def _start_set(self, now: int) -> None:
        cfg = self.cfg
        if self.best and self.best_utility > cfg.utility_threshold:
            self.plain_set_len = cfg.set_iters
            self._enter(Phase.SET, self.best, cfg.set_iters, now)
        else:
            self._enter(Phase.SET, 0, self.plain_set_len, now)
            self.plain_set_len = min(2 * self.plain_set_len, cfg.max_backoff)

    def stats(self) -> dict:
        ladder = self.cfg.ladder
        return {
            "phase": self.phase.value,
            "config": ladder[self.index].label(),
            "iterations": self.iterations,
            "speculating_share": self.spec_iterations / self.iterations if self.iterations else 0.0,
            "tests": self.tests,
            "utility": {ladder[i].label(): u for i, u in enumerate(self.utility) if u is not None},
            "t_base_s": self.t_base,
            "next_plain_set_iters": self.plain_set_len,
            "config_history": [list(x) for x in self.config_history],
            "phase_history": [list(x) for x in self.phase_history],
        }
