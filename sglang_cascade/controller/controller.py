"""CascadeController: the per-iteration entry point an engine drives.

Per iteration: cfgs = decide(running rids); run the batch with them; observe(IterationRecord).
Decisions depend only on what observe() was given, so ranks fed the same records (all-reduced
timings, or one rank deciding and broadcasting) decide the same.
"""

from __future__ import annotations

from .config import CascadeConfig
from .cost_model import MoECostModel
from .state import Phase, RequestState
from .types import IterationRecord, SpecConfig


class CascadeController:
    """Chooses a SpecConfig per running request from measured utility (DESIGN.md, "The method").

    The engine must run each request with the config decide() returned for it: observe()
    attributes a request's accepted tokens and cost to the rung it is trying. Requests in a record
    that the controller does not track still count in the cost model's batch.
    """

    def __init__(self, config: CascadeConfig, cost_model: MoECostModel):
        self.config = config
        self.cost_model = cost_model
        self.iteration = 0                                  # iterations observed so far
        self._states: dict[str, RequestState] = {}
        self._rung_iterations = [0] * len(config.ladder)     # request-iterations per rung, all requests
        self._finished = 0
        self._draft_share = 0.0                              # EMA of draft_time_s / wall_time_s
        self._allocate_shared = config.batch_cost == "allocated"

    def add_request(self, rid: str) -> None:
        """A request enters the batch; it starts in BASE (plain) unless warm-up is off."""
        if rid not in self._states:
            self._states[rid] = RequestState(self.config, self.iteration)

    def finish_request(self, rid: str) -> None:
        """A request finished or was aborted: forget it (unknown rids are ignored)."""
        if self._states.pop(rid, None) is not None:
            self._finished += 1

    def decide(self, rids) -> dict[str, SpecConfig]:
        """Config for every running request this iteration; unknown rids are added first."""
        ladder, states, out = self.config.ladder, self._states, {}
        for rid in rids:
            st = states.get(rid)
            if st is None:
                self.add_request(rid)
                st = states[rid]
            out[rid] = ladder[st.index]
        return out

    def observe(self, record: IterationRecord) -> None:
        """Account one finished iteration: fit the cost model, advance each request's state.

        Uses wall_time_s (whole iteration, drafting included), and per request accepted,
        tokens_verified, seq_len and config; distinct_experts (per layer) when the engine counts
        them; draft_time_s only for summary().
        """
        model, states, now = self.cost_model, self._states, self.iteration
        wall = record.wall_time_s
        model.observe(record)
        alone = len(record.requests) == 1
        if wall > 0:
            self._draft_share += 0.05 * (record.draft_time_s / wall - self._draft_share)
        rungs = self._rung_iterations
        rels = None   # model costs, computed once if any request needs them
        for k, obs in enumerate(record.requests):
            st = states.get(obs.rid)
            if st is None:
                continue
            rungs[st.index] += 1
            rel = 0.0
            if st.index:
                t_base = alone and st.plain_time(now)   # batch 1: the paper's measured ratio
                if t_base:
                    rel = wall / t_base
                else:
                    if rels is None:
                        rels = model.relative_costs(record, self._allocate_shared)
                    rel = rels[k]
            st.observe(obs, rel, alone, wall, now)
        self.iteration = now + 1

    def request_stats(self, rid: str) -> dict:
        """JSON-able state of one running request (KeyError if unknown or finished)."""
        return self._states[rid].stats()

    def summary(self) -> dict:
        """JSON-able aggregate over running requests and all iterations so far."""
        states = list(self._states.values())
        ladder = self.config.ladder
        spec = [s for s in states if s.index]
        total = sum(self._rung_iterations)
        return {
            "iterations": self.iteration,
            "requests_running": len(states),
            "requests_finished": self._finished,
            "speculating_share": len(spec) / len(states) if states else 0.0,
            "mean_draft_tokens": sum(ladder[s.index].draft_tokens for s in states) / len(states) if states else 0.0,
            "phases": {p.value: sum(s.phase is p for s in states) for p in Phase},
            "request_iterations_per_config": {c.label(): n for c, n in zip(ladder, self._rung_iterations)},
            "speculative_iteration_share": (total - self._rung_iterations[0]) / total if total else 0.0,
            "draft_time_share": self._draft_share,
            "cost_model": self.cost_model.describe(),
            "config": {"candidates": [c.label() for c in ladder],
                       **{k: v for k, v in vars(self.config).items() if k != "candidates"}},
        }
