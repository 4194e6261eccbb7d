"""Per-request Cascade state machine: BASE -> TEST -> SET -> (BASE ->) TEST -> ...

BASE  plain iterations that measure the request's plain-decode cost t_base (at its start, and again
      when t_base is older than base_refresh iterations and the request runs alone).
TEST  trials of trial_iters iterations, one ladder rung each, at most max_trials: hill-climbing from
      the best speculative rung seen so far (rules in _after_trial). A request's first test is
      skipped where other requests' utilities (SharedPrior) already say which rung to set, and
      where they say plain, the population's back-off sets how long it runs plain first.
SET   the winner for set_iters iterations; a plain winner runs set_iters * 2^j iterations, j counting
      consecutive plain set phases (back-off, capped at max_backoff), so a request that never profits
      re-tests ever more rarely but never stops testing. A speculative set phase whose utility so far
      is below utility_threshold after a multiple of trial_iters iterations (what a trial needs to
      judge a rung) ends there and the request tests: acceptance that collapsed, or a prior that does
      not fit the request, costs a trial's length instead of a set phase's.

Utility of a stretch of iterations: tokens emitted (accepted + 1 each) / sum of relative costs, a
relative cost being this iteration's cost over a plain iteration's (1 for plain, by definition).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum

from .config import CascadeConfig

HISTORY = 64   # transitions kept per request for request_stats(); bounded so state never grows


class Phase(str, Enum):
    BASE = "base"
    TEST = "test"
    SET = "set"


# Module-level names for the members: reading one off the Enum class is a descriptor call (~5x a
# global lookup in Python 3.11), and transitions run every iteration for a share of the batch.
BASE, TEST, SET = Phase.BASE, Phase.TEST, Phase.SET

ALLOWED_TRANSITIONS = {BASE: {TEST, SET}, TEST: {SET}, SET: {TEST, BASE}}


class SharedPrior:
    """Recent utility per ladder rung across requests, and the population's back-off: where a new
    request starts, and for how long.

    An EMA of every utility measured on a rung (trials and set phases of all requests). start()
    answers once `min_samples` utilities were measured: the best rung whose estimate beats the
    threshold for a set phase of set_iters, or plain when none does; None before that.

    A plain start lasts set_iters * 2^j, j counting the test phases in a row (any request's) that
    ended plain, capped where that reaches max_backoff; every 2^j-th plain start keeps set_iters, so
    some new requests still test soon and one test that finds a paying rung resets j. The paper's
    per-request back-off cannot help a request shorter than its first plain set phase; this one
    carries what earlier requests learnt to the short requests of a serving load.
    """

    EMA = 0.25

    def __init__(self, cfg: CascadeConfig):
        self.estimate: list = [None] * len(cfg.ladder)
        self.samples = 0
        self.min_samples = cfg.prior_samples   # >= 1: the controller keeps no prior when it is 0
        self.threshold = cfg.utility_threshold
        self.set_iters = cfg.set_iters
        self.max_doublings = (cfg.max_backoff // cfg.set_iters).bit_length() - 1
        self.losing_tests = 0     # test phases in a row, over all requests, that ended plain
        self.plain_starts = 0

    def observe(self, index: int, u: float) -> None:
        old = self.estimate[index]
        self.estimate[index] = u if old is None else old + self.EMA * (u - old)
        self.samples += 1

    def test_ended(self, speculative: bool) -> None:
        self.losing_tests = 0 if speculative else self.losing_tests + 1

    def start(self) -> tuple[int, int] | None:
        """(rung, set phase length) for a new request, or None: not enough measured yet, test."""
        if self.samples < self.min_samples:
            return None
        known = [(u, i) for i, u in enumerate(self.estimate) if i and u is not None]
        u, i = max(known) if known else (0.0, 0)
        if u > self.threshold:
            return i, self.set_iters
        self.plain_starts += 1
        doublings = min(self.losing_tests, self.max_doublings)
        explore = self.plain_starts % (1 << doublings) == 0
        return 0, self.set_iters if explore else self.set_iters << doublings


class RequestState:
    """One request's phase, current rung and utility estimates (indices into the config's ladder).

    The current stretch (one phase on one rung) runs `length` iterations; `left` of them remain,
    `accepted` and `cost` sum the draft tokens accepted and relative costs so far, on a speculative
    rung only: a plain stretch's utility is never read.
    """

    __slots__ = ("cfg", "rung_iterations", "prior", "prior_pending", "phase", "index", "length", "left",
                 "utility", "accepted", "cost", "t_base", "t_base_at", "base_samples", "direction", "trials",
                 "best", "best_utility", "plain_set_len", "iterations", "spec_iterations", "tests",
                 "config_history", "phase_history")

    def __init__(self, cfg: CascadeConfig, now: int, rung_iterations: list[int],
                 prior: SharedPrior | None = None):
        """rung_iterations: the controller's request-iterations per rung, added to per stretch; prior:
        the population's utilities, fed this request's measurements and consulted at its first test."""
        self.cfg = cfg
        self.rung_iterations = rung_iterations
        self.prior = prior
        self.prior_pending = prior is not None
        self.utility: list = [None] * len(cfg.ladder)   # latest measured utility per rung
        self.t_base = None          # seconds of a plain iteration alone, and when last measured
        self.t_base_at = -1
        self.base_samples = 0
        self.plain_set_len = cfg.set_iters
        self.iterations = self.spec_iterations = self.tests = 0   # over closed stretches
        self.config_history: deque = deque(maxlen=HISTORY)
        self.phase_history: deque = deque(maxlen=HISTORY)
        self.index = -1
        self.length = self.left = 0
        self.phase = None
        if cfg.warmup_iters:
            self._enter(BASE, 0, cfg.warmup_iters, now)
        else:
            self._start_test(now)

    def skip_base(self, now: int) -> None:
        """End the plain warm-up (BASE) before it ran, as if warm-up were off."""
        self.phase = None   # no BASE entry in the histories: it never ran
        self.phase_history.clear()
        self.config_history.clear()
        self.index = -1
        self._start_test(now)

    def plain_time(self, now: int):
        """t_base if measured within the last 2 * base_refresh iterations, else None (stale)."""
        return self.t_base if now - self.t_base_at <= 2 * self.cfg.base_refresh else None

    def _enter(self, phase: Phase, index: int, length: int, now: int) -> None:
        self.close_stretch()
        if phase is not self.phase:   # histories keep Phase and rung index; stats() spells them out
            self.phase_history.append((now, phase))
        if index != self.index:
            self.config_history.append((now, index))
        self.phase, self.index, self.length, self.left = phase, index, length, length
        self.accepted, self.cost = 0, 0.0

    def close_stretch(self) -> None:
        """Move the current stretch's iterations into the request's and the controller's counters.

        Counting per stretch instead of per iteration leaves observe_iteration, which runs for
        every request every iteration, only `left` to count down (and utility's sums).
        """
        done = self.length - self.left
        if done:
            self.iterations += done
            if self.index:
                self.spec_iterations += done
            self.rung_iterations[self.index] += done
            self.length = self.left

    # -- transitions -----------------------------------------------------------------------------
    def _end_stretch(self, alone: bool, now: int) -> None:
        """The stretch run at iteration `now` is over: move on.

        A stretch's utility is (accepted + iterations) / cost, read only on a speculative rung
        (TEST always is one), so observe_iteration sums nothing for plain stretches.
        """
        nxt = now + 1
        if self.phase is BASE:
            self._start_test(nxt)
        elif self.phase is TEST:
            self._after_trial((self.accepted + self.length) / self.cost, nxt)
        else:
            if self.index:
                self._measured(self.index, (self.accepted + self.length) / self.cost)
            if self.cfg.warmup_iters and alone and now - self.t_base_at >= self.cfg.base_refresh:
                self.base_samples = 0
                self._enter(BASE, 0, self.cfg.warmup_iters, nxt)
            else:
                self._start_test(nxt)

    def _measured(self, index: int, u: float) -> None:
        """A stretch on speculative rung `index` measured utility u: this request's and the prior's."""
        self.utility[index] = u
        if self.prior is not None:
            self.prior.observe(index, u)

    def _plain_sample(self, wall_time_s: float, now: int) -> None:
        """BASE averages its samples afresh; other plain iterations alone nudge t_base (EMA 0.25)."""
        if self.phase is BASE or self.t_base is None:
            self.base_samples += 1
            prev = self.t_base if self.base_samples > 1 else 0.0
            self.t_base = prev + (wall_time_s - prev) / self.base_samples
        else:
            self.t_base += 0.25 * (wall_time_s - self.t_base)
        self.t_base_at = now

    def _start_test(self, now: int) -> None:
        """First trial: the best speculative rung measured so far, else the smallest one. A ladder of
        plain alone has nothing to test: plain set phases only."""
        if len(self.cfg.ladder) == 1:
            self._enter(SET, 0, self.cfg.max_backoff, now)
            return
        if self.prior_pending:   # the first test: other requests' utilities may already answer it
            self.prior_pending = False
            start = self.prior.start()
            if start is not None:
                self._enter(SET, *start, now)
                return
        known = [(u, i) for i, u in enumerate(self.utility) if i and u is not None]
        start = max(known)[1] if known else 1
        self.direction, self.trials = 1, 0
        self.best, self.best_utility = 0, 0.0
        self.tests += 1
        self._enter(TEST, start, self.cfg.trial_iters, now)

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
        self._measured(i, u)
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
            self._enter(TEST, nxt, cfg.trial_iters, now)

    def _start_set(self, now: int) -> None:
        cfg = self.cfg
        speculate = self.best and self.best_utility > cfg.utility_threshold
        if self.prior is not None:
            self.prior.test_ended(speculate)
        if speculate:
            self.plain_set_len = cfg.set_iters
            self._enter(SET, self.best, cfg.set_iters, now)
        else:
            self._enter(SET, 0, self.plain_set_len, now)
            self.plain_set_len = min(2 * self.plain_set_len, cfg.max_backoff)

    def stats(self) -> dict:
        ladder = self.cfg.ladder
        running = self.length - self.left
        iterations = self.iterations + running
        spec_iterations = self.spec_iterations + (running if self.index else 0)
        return {
            "phase": self.phase.value,
            "config": ladder[self.index].label(),
            "iterations": iterations,
            "speculating_share": spec_iterations / iterations if iterations else 0.0,
            "tests": self.tests,
            "utility": {ladder[i].label(): u for i, u in enumerate(self.utility) if u is not None},
            "t_base_s": self.t_base,
            "next_plain_set_iters": self.plain_set_len,
            "config_history": [[at, ladder[i].label()] for at, i in self.config_history],
            "phase_history": [[at, phase.value] for at, phase in self.phase_history],
        }


def observe_iteration(cfg: CascadeConfig, states: dict, requests: list, costs: Callable[[], list[float]],
                      alone: bool, wall_time_s: float, now: int) -> None:
    """Account iteration `now` for every request of `requests` found in `states` (rid -> RequestState).

    costs(): each request's relative cost (a list parallel to `requests`), called at most once and
    only if a tracked request ran a speculative rung; plain iterations cost 1 by definition. alone
    says the batch was one request, so a plain iteration's wall time is its own plain cost t_base.
    One loop over the batch with the per-request work inlined: at batch 256 a method call per
    request would cost more than the accounting itself.
    """
    get = states.get
    rels = None
    trial, threshold = cfg.trial_iters, cfg.utility_threshold
    for k, obs in enumerate(requests):
        st = get(obs.rid)
        if st is None:
            continue
        if st.index:
            if rels is None:
                rels = costs()
            st.cost += rels[k]
            st.accepted += obs.accepted
            st.left -= 1
            if st.left and st.phase is SET:
                done = st.length - st.left
                if done % trial == 0 and st.accepted + done < threshold * st.cost:   # losing: stop now
                    st.length, st.left = done, 0
        else:
            if alone:
                st._plain_sample(wall_time_s, now)
            st.left -= 1
        if st.left <= 0:
            st._end_stretch(alone, now)
