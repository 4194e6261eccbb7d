"""CascadeController: the per-iteration entry point an engine drives.

Per iteration: cfgs = decide(running rids); run the batch with them; observe(IterationRecord).
Decisions depend only on what observe() was given, so ranks fed the same records (all-reduced
timings, or one rank deciding and broadcasting) decide the same.
"""

from __future__ import annotations

from .config import CascadeConfig
from .cost_model import MoECostModel
from .state import Phase, RequestState, SharedPrior, observe_iteration
from .types import IterationRecord, SpecConfig


class CascadeController:
    """Chooses a SpecConfig per running request from measured utility (docs/design.md, section 3).

    The engine must run each request with the config decide() returned for it: observe()
    attributes a request's accepted tokens and cost to the rung it is trying. Requests in a record
    that the controller does not track still count in the cost model's batch.
    """

    name = "cascade"

    def __init__(self, config: CascadeConfig, cost_model: MoECostModel):
        self.config = config
        self.cost_model = cost_model
        self.iteration = 0                                  # iterations observed so far
        self._states: dict[str, RequestState] = {}
        self._rung_iterations = [0] * len(config.ladder)     # request-iterations per rung, closed stretches
        self._finished = 0
        self._draft_share = 0.0                              # EMA of draft_time_s / wall_time_s
        self._prior = SharedPrior(config) if config.prior_samples else None
        self._fresh: set[str] = set()                        # added, in their warm-up, never decided for

    def add_request(self, rid: str) -> None:
        """A request enters the batch; it starts in BASE (plain) unless warm-up is off or its first
        decision is in a batch (see decide), then sets the rung other requests found best, or tests
        when they have not measured enough yet."""
        if rid not in self._states:
            st = RequestState(self.config, self.iteration, self._rung_iterations, self._prior)
            self._states[rid] = st
            if st.phase is Phase.BASE:
                self._fresh.add(rid)

    def finish_request(self, rid: str) -> None:
        """A request finished or was aborted: forget it (unknown rids are ignored)."""
        st = self._states.pop(rid, None)
        self._fresh.discard(rid)
        if st is not None:
            st.close_stretch()
            self._finished += 1

    def decide(self, rids) -> dict[str, SpecConfig]:
        """Config for every running request this iteration; unknown rids are added first."""
        ladder, states = self.config.ladder, self._states
        if not isinstance(rids, (list, tuple)):
            rids = list(rids)
        try:   # every rid known: the common case, one comprehension
            if self._fresh:
                self._first_decisions(rids)
            return {rid: ladder[states[rid].index] for rid in rids}
        except KeyError:   # new requests: add them in batch order, then decide again
            for rid in rids:
                if rid not in states:
                    self.add_request(rid)
            return self.decide(rids)

    def _first_decisions(self, rids: list[str]) -> None:
        """Requests decided for the first time in a batch skip their plain warm-up (ours): it measures
        the plain cost by the clock, which only a batch of one can (in a batch, costs come from the
        cost model; t_base is measured whenever the request runs alone), so in a batch it would only
        delay speculation. Never decided before, no plain_ahead() answer covered them."""
        fresh, batch = self._fresh, len(rids) > 1
        for rid in rids:
            if rid in fresh:
                fresh.discard(rid)
                if batch:
                    self._states[rid].skip_base(self.iteration)

    def plain_ahead(self, rids, pending: int) -> bool:
        """Whether decide() keeps every one of rids plain after `pending` more observe() calls: each is
        known and inside a plain stretch with more than `pending` iterations left. An engine that
        can skip work only speculation needs (SGLang's draft extend) asks before skipping it."""
        states = self._states
        for rid in rids:
            st = states.get(rid)
            if st is None or st.index or st.left <= pending:
                return False
        return True

    def observe(self, record: IterationRecord) -> None:
        """Account one finished iteration: fit the cost model, advance each request's state.

        Uses wall_time_s (whole iteration, drafting included), and per request accepted,
        tokens_verified, seq_len and config; distinct_experts (per layer) when the engine counts
        them; draft_time_s only for summary().
        """
        model, now, wall = self.cost_model, self.iteration, record.wall_time_s
        model.observe(record)
        requests = record.requests
        alone = len(requests) == 1
        if wall > 0:
            self._draft_share += 0.05 * (record.draft_time_s / wall - self._draft_share)

        def costs() -> list[float]:
            if alone:   # batch 1: the paper's measured ratio, while t_base is fresh
                t_base = self._states[requests[0].rid].plain_time(now)
                if t_base:
                    return [wall / t_base]
            return model.relative_costs(record, self.config.batch_cost)

        observe_iteration(self.config, self._states, requests, costs, alone, wall, now)
        self.iteration = now + 1

    def request_stats(self, rid: str) -> dict:
        """JSON-able state of one running request (KeyError if unknown or finished)."""
        return self._states[rid].stats()

    def summary(self) -> dict:
        """JSON-able aggregate over running requests and all iterations so far."""
        states = list(self._states.values())
        ladder = self.config.ladder
        spec = [s for s in states if s.index]
        rungs = self._rung_iterations[:]   # closed stretches, plus the running ones so far
        for s in states:
            rungs[s.index] += s.length - s.left
        total = sum(rungs)
        return {
            "iterations": self.iteration,
            "requests_running": len(states),
            "requests_finished": self._finished,
            "speculating_share": len(spec) / len(states) if states else 0.0,
            "mean_draft_tokens": sum(ladder[s.index].draft_tokens for s in states) / len(states) if states else 0.0,
            "phases": {p.value: sum(s.phase is p for s in states) for p in Phase},
            "request_iterations_per_config": {c.label(): n for c, n in zip(ladder, rungs)},
            "speculative_iteration_share": (total - rungs[0]) / total if total else 0.0,
            "draft_time_share": self._draft_share,
            "cost_model": self.cost_model.describe(),
            "config": {"candidates": [c.label() for c in ladder],
                       **{k: v for k, v in vars(self.config).items() if k != "candidates"}},
        }
