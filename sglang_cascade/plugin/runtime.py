"""Per scheduler process: the Cascade controller and what the plugin counts per request.

One decode iteration = begin() (EAGLEWorkerV2.forward_batch_generation hook: the batch's requests,
the controller's decisions, the batch's steps) + complete() (the adaptive policy's
on_verify_complete, called by SGLang's result processor once accept counts are on the host).
Completion, not the forward's return, closes the iteration because on a GPU the forward returns
before the device finishes; the accept counts' host copy is the first point where it has. Under the
overlap scheduler the next begin() precedes this completion, hence a FIFO of open iterations, and an
iteration's wall time runs from the later of its begin and the previous completion.

A batch that decodes plain (steps 0) and whose requests the controller keeps plain at the next
decision too skips the draft model's extend after its verify (--cascade-plain-draft-extend skip):
the draft state it would have prepared is not read before the next extend refreshes it. The draft's
KV cache at the skipped positions stays stale, which a later speculative stretch drafts over.

The batch runs one step count (SGLang's verify is uniform-width), the deepest any request chose;
prune() then cuts each shallower request's chain at its own budget before verification, so no
request accepts more drafts than the rung it is trying; the target still computes the cut rows, but
pruned_experts.py keeps them from loading experts of their own.

The first decode iterations a scheduler runs (SGLang's start-up warm-up request, unless
--skip-server-warmup) walk every captured step count once with all budgets 0: SGLang compiles
parts of multi-step drafting (torch.compile) on a tier's first use, which took 2-4 s on the CPU
kit; a static server pays it in its own warm-up, so Cascade pays it there too. Budgets 0 keep the
output plain's; the controller does not see these iterations.

Each speculative verify's distinct experts per MoE layer, as loaded after the cut rows' rewrite,
reach the controller's IterationRecord (its cost model fits its routing estimate to them): counted
at completion, when the device has finished anyway, in one device-to-host transfer per iteration.

With --cascade-iteration-log, each completed iteration appends one JSON line (TP rank 0): its wall
time, the batch's steps, whether it skipped the draft extend, each request's id, budget, accepted
drafts and sequence length, the distinct experts per MoE layer of its verify, as routed and as
loaded, and the cost model's routing estimate after it. With SGLang's --enable-metrics, TP rank 0
also feeds Cascade's Prometheus series (metrics.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque

import torch
from dataclasses import dataclass, field

from sglang_cascade.controller import (CascadeController, IterationRecord, MoECostModel, RequestObservation,
                                       SpecConfig)

from .flags import PluginSettings
from .log import announce
from .pruned_experts import ExpertCounts

HISTORY = 64         # config changes kept per request in meta_info
DIGEST_EVERY = 100   # decode iterations between log lines of the decisions' digest (TP ranks compare)


@dataclass
class RequestFigures:
    """The plugin's own per-request counts (SGLang's assume a fixed draft count)."""

    iterations: int = 0
    speculative_iterations: int = 0
    drafts_proposed: int = 0
    drafts_accepted: int = 0
    beyond_budget: int = 0    # iterations it accepted more drafts than its own budget (0 with pruning)
    config: str = ""
    config_history: list = field(default_factory=list)   # [decode iteration of the request, config label]

    def record(self, chosen: SpecConfig, accepted: int) -> None:
        label = chosen.label()
        if label != self.config:
            self.config = label
            self.config_history.append([self.iterations, label])
            del self.config_history[:-HISTORY]
        self.iterations += 1
        self.speculative_iterations += chosen.steps > 0
        self.drafts_proposed += chosen.steps    # its own budget: prune() cuts the batch's deeper rows
        self.drafts_accepted += accepted
        self.beyond_budget += accepted > chosen.steps


@dataclass
class _OpenIteration:
    began: float
    rids: list
    configs: list
    steps: int
    seq_lens: list
    warm_up: bool = False   # a tier warm-up iteration: budgets 0, not shown to the controller
    skip_draft_extend: bool = False
    experts: ExpertCounts | None = None   # distinct experts per layer of its verify, still on the device


class CascadeRuntime:
    def __init__(self, settings: PluginSettings, initial_steps: int):
        self.settings = settings
        self.captured = set(settings.captured_steps)
        self._warm_up = sorted((s for s in self.captured if s), reverse=True)   # tiers not run yet
        self.controller: CascadeController | None = None   # built at the first decode (needs the model)
        self.figures: dict[str, RequestFigures] = {}
        self.steps = initial_steps          # steps of the latest planned batch
        self.decisions = 0                  # decode iterations planned, for the logs
        self._open: deque[_OpenIteration] = deque()
        self._last_completion = 0.0
        self._broadcast = None
        self._digest = ""                   # hash chain over every batch's per-request budgets so far
        self._by_steps = {}
        self._log = None
        self._metrics = None

    def attach(self, shape, broadcast, rank: int) -> None:
        """Build the controller for the target's shape; broadcast(obj) returns TP rank 0's obj."""
        self.controller = CascadeController(self.settings.cascade, MoECostModel(shape))
        self._by_steps = {c.steps: c for c in self.settings.cascade.ladder}   # chains: one per step count
        self._broadcast = broadcast
        if rank == 0 and self.settings.iteration_log:
            self._log = open(self.settings.iteration_log, "a", buffering=1)
        if rank == 0 and self.settings.metrics:
            from .metrics import CascadeMetrics

            self._metrics = CascadeMetrics()

    @property
    def warming_up(self) -> bool:
        """Whether the latest planned iteration is a tier warm-up (see the module docstring)."""
        return bool(self._open) and self._open[-1].warm_up

    @property
    def skip_draft_extend(self) -> bool:
        """Whether the latest planned iteration skips the draft extend after its verify."""
        return bool(self._open) and self._open[-1].skip_draft_extend

    # -- one iteration ------------------------------------------------------------------------
    def begin(self, reqs) -> int:
        """Decide for the batch's requests; return the batch's steps (a captured step count)."""
        rids = [r.rid for r in reqs]
        for gone in set(self.figures) - set(rids):   # finished, aborted or retracted since
            self.finish(gone)
        warm_up = bool(self._warm_up)
        if warm_up:   # the same on every TP rank: no broadcast
            budgets, steps, skip = [0] * len(rids), self._warm_up.pop(0), False
        else:
            decided = self.controller.decide(rids)
            # plain now and at the next decision, whatever the iterations still open report
            skip = (self.settings.skip_plain_draft_extend
                    and self.controller.plain_ahead(rids, pending=len(self._open) + 1))
            # TP ranks must run the same budgets and skips (their verify results and collectives must
            # agree): TP rank 0's decisions are the batch's
            budgets, skip = self._broadcast(([decided[rid].steps for rid in rids], skip))
            steps = max(budgets)   # every ladder step count has a captured runtime state (flags.plan)
        configs = [self._by_steps[b] for b in budgets]
        for rid in rids:
            self.figures.setdefault(rid, RequestFigures())
        self._open.append(_OpenIteration(time.perf_counter(), rids, configs, steps, [r.seqlen for r in reqs],
                                         warm_up, skip))
        self.steps = steps
        self.decisions += 1
        self._digest = hashlib.sha1(f"{self._digest}{budgets};".encode()).hexdigest()
        if self.decisions % DIGEST_EVERY == 0:
            announce(f"{self.decisions} decode iterations planned; digest of their per-request budgets "
                     f"{self._digest[:16]}")
        return steps

    def prune(self, spec_info, steps: int) -> list[int] | None:
        """Cut the chains of the batch being verified at each request's own budget; return the budgets.

        Verification walks `retrieve_next_token` (node i -> node i+1 along a chain): unlinking node b
        of a request stops its acceptance after b drafts. The tensor is replaced, not edited in place,
        as SGLang may reuse its buffers. None: the batch is not the one this runtime planned.
        """
        if not self._open:
            return None
        budgets = [c.steps for c in self._open[-1].configs]
        nxt = spec_info.retrieve_next_token
        if len(budgets) != nxt.shape[0]:
            return None
        cut = [(row, b) for row, b in enumerate(budgets) if b < steps]
        if cut:
            nxt = nxt.clone()
            rows, cols = zip(*cut)
            nxt[torch.tensor(rows, device=nxt.device), torch.tensor(cols, device=nxt.device)] = -1
            spec_info.retrieve_next_token = nxt
        return budgets

    def record_experts(self, counts: ExpertCounts | None) -> None:
        """Distinct experts per layer of the verify that just ran (the latest planned iteration's)."""
        if counts is not None and self._open:
            self._open[-1].experts = counts

    def complete(self, accepted_per_req: list[int]) -> None:
        """The oldest open iteration verified: account it to the controller and the figures."""
        if not self._open:
            return
        it = self._open.popleft()
        now = time.perf_counter()
        wall = now - max(it.began, self._last_completion)
        self._last_completion = now
        if len(accepted_per_req) != len(it.rids):
            return
        observations = []
        for rid, chosen, seq_len, accepted in zip(it.rids, it.configs, it.seq_lens, accepted_per_req):
            fig = self.figures.get(rid)
            if fig is not None:
                fig.record(chosen, accepted)
            # verify is uniform-width: the target runs every request to the batch's steps, the cut
            # rows past its own budget included (they route no experts of their own)
            observations.append(RequestObservation(rid=rid, config=chosen, accepted=accepted,
                                                   tokens_verified=chosen.steps + 1, seq_len=seq_len,
                                                   rows=it.steps + 1))
        loaded, routed = it.experts.resolve() if it.experts is not None else ([], [])
        if not it.warm_up:
            self.controller.observe(IterationRecord(wall_time_s=wall, requests=observations, distinct_experts=loaded))
        budgets = [c.steps for c in it.configs]
        if self._metrics is not None:
            self._metrics.iteration(budgets, accepted_per_req)
        if self._log is not None:
            self._log.write(json.dumps({
                "t": time.time(), "wall_s": wall, "batch": len(it.rids), "steps": it.steps,
                "skipped_draft_extend": it.skip_draft_extend, "rids": it.rids,
                "budgets": budgets, "accepted": list(accepted_per_req),
                "seq_lens": it.seq_lens, "experts_routed": routed, "experts_loaded": loaded,
                "routing_eta": self.controller.cost_model.eta}) + "\n")

    # -- per request ----------------------------------------------------------------------------
    def snapshot(self, rid: str) -> dict | None:
        """JSON-able Cascade figures of a running request (None if the plugin never saw it decode)."""
        fig = self.figures.get(rid)
        if fig is None or self.controller is None:
            return None
        try:
            state = self.controller.request_stats(rid)
        except KeyError:
            state = {}
        return {
            "config": fig.config,
            "config_history": list(fig.config_history),
            "phase": state.get("phase"),
            "utility": state.get("utility", {}),
            "decode_iterations": fig.iterations,
            "speculative_iterations": fig.speculative_iterations,
            "drafts_proposed": fig.drafts_proposed,
            "drafts_accepted": fig.drafts_accepted,
            "accept_rate": fig.drafts_accepted / fig.drafts_proposed if fig.drafts_proposed else 0.0,
            "accepted_beyond_budget": fig.beyond_budget,
        }

    def finish(self, rid: str) -> None:
        self.figures.pop(rid, None)
        if self.controller is None:
            return
        if self._metrics is not None:
            try:
                self._metrics.finished(self.controller.request_stats(rid)["utility"])
            except KeyError:
                pass
        self.controller.finish_request(rid)


_RUNTIME: CascadeRuntime | None = None


def get_runtime() -> CascadeRuntime | None:
    return _RUNTIME


def start_runtime(settings: PluginSettings, initial_steps: int) -> CascadeRuntime:
    global _RUNTIME
    _RUNTIME = CascadeRuntime(settings, initial_steps)
    return _RUNTIME
