"""Per scheduler process: SGLang's mechanism around the Cascade session (controller/session.py).

One decode iteration = begin() (EAGLEWorkerV2.forward_batch_generation hook: the batch's requests,
the session's decisions, the batch's steps) + complete() (the adaptive policy's
on_verify_complete, called by SGLang's result processor once accept counts are on the host).
Completion, not the forward's return, closes the iteration because on a GPU the forward returns
before the device finishes; the accept counts' host copy is the first point where it has. The
session keeps the per-request figures, the open iterations and the iteration log; this module keeps
what only SGLang needs: tiers, their warm-up, TP agreement, pruning and expert counts.

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
reach the controller's IterationRecord: counted at completion, when the device has finished anyway,
in one device-to-host transfer. With --cascade-iteration-log, TP rank 0 writes the session's line
per iteration plus the batch's steps, whether it skipped the draft extend and the experts as routed
(its `distinct_experts` are those loaded); with --enable-metrics it feeds metrics.py's series.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from sglang_cascade.controller import CascadeController, MoECostModel
from sglang_cascade.controller.cost_model import machine_balance
from sglang_cascade.controller.session import SpecSession

from .flags import PluginSettings
from .log import announce
from .pruned_experts import ExpertCounts

DIGEST_EVERY = 100   # decode iterations between log lines of the decisions' digest (TP ranks compare)


@dataclass
class _Tier:
    """What SGLang ran for one iteration, beside the session's record of it."""

    steps: int
    warm_up: bool = False                 # a tier warm-up iteration: budgets 0, not shown to the controller
    skip_draft_extend: bool = False
    experts: ExpertCounts | None = None   # distinct experts per layer of its verify, still on the device


class CascadeRuntime:
    def __init__(self, settings: PluginSettings, initial_steps: int):
        self.settings = settings
        self.captured = set(settings.captured_steps)
        self._warm_up = sorted((s for s in self.captured if s), reverse=True)   # tiers not run yet
        self.session: SpecSession | None = None   # built at the first decode (needs the model)
        self.steps = initial_steps                # steps of the latest planned batch
        self._latest: _Tier | None = None
        self._metrics = None

    def attach(self, shape, device_type: str, broadcast, rank: int) -> None:
        """Build the session for the target's shape on its device; broadcast(obj) returns TP rank 0's obj."""
        log = None
        if rank == 0 and self.settings.iteration_log:
            stream = open(self.settings.iteration_log, "a", buffering=1)
            log = lambda line: stream.write(json.dumps(line) + "\n")   # noqa: E731
        if rank == 0 and self.settings.metrics:
            from .metrics import CascadeMetrics

            self._metrics = CascadeMetrics()
        model = MoECostModel(shape, flops_per_byte=machine_balance(device_type))
        self.session = SpecSession(CascadeController(self.settings.cascade, model),
                                   broadcast=broadcast, log=log)

    @property
    def warming_up(self) -> bool:
        """Whether the latest planned iteration is a tier warm-up (see the module docstring)."""
        return self._latest is not None and self._latest.warm_up

    @property
    def skip_draft_extend(self) -> bool:
        """Whether the latest planned iteration skips the draft extend after its verify."""
        return self._latest is not None and self._latest.skip_draft_extend

    # -- one iteration ------------------------------------------------------------------------
    def begin(self, reqs) -> int:
        """Decide for the batch's requests; return the batch's steps (a captured step count)."""
        session, rids = self.session, [r.rid for r in reqs]
        for gone in set(session.figures) - set(rids):   # finished, aborted or retracted since
            self.finish(gone)
        tier = _Tier(self._warm_up.pop(0), warm_up=True) if self._warm_up else _Tier(0)
        configs = session.begin(rids, [r.seqlen for r in reqs], learn=not tier.warm_up, note=tier)
        if not tier.warm_up:
            tier.steps = max(c.steps for c in configs)   # every ladder step count is captured (flags.plan)
            tier.skip_draft_extend = self.settings.skip_plain_draft_extend and session.plain_ahead()
        self._latest, self.steps = tier, tier.steps
        if session.decisions % DIGEST_EVERY == 0:
            announce(f"{session.decisions} decode iterations planned; digest of their per-request budgets "
                     f"{session.digest[:16]}")
        return tier.steps

    def prune(self, spec_info, steps: int) -> list[int] | None:
        """Cut the chains of the batch being verified at each request's own budget; return the budgets.

        Verification walks `retrieve_next_token` (node i -> node i+1 along a chain): unlinking node b
        of a request stops its acceptance after b drafts. The tensor is replaced, not edited in place,
        as SGLang may reuse its buffers. None: the batch is not the one this runtime planned.
        """
        budgets = [c.steps for c in self.session.latest] if self.session else []
        nxt = spec_info.retrieve_next_token
        if not budgets or len(budgets) != nxt.shape[0]:
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
        if counts is not None and self._latest is not None:
            self._latest.experts = counts

    def complete(self, accepted_per_req: list[int]) -> None:
        """The oldest open iteration verified: the session accounts it (the controller learns from it)."""
        tier = self.session.oldest_note if self.session else None
        if tier is None:
            return
        loaded, routed = tier.experts.resolve() if tier.experts is not None else ([], [])
        # verify is uniform-width: the target runs every request to the batch's steps, the cut rows
        # past its own budget included (they route no experts of their own)
        record = self.session.complete(accepted_per_req, rows=tier.steps + 1, distinct_experts=loaded,
                                       extra={"steps": tier.steps, "skipped_draft_extend": tier.skip_draft_extend,
                                              "experts_routed": routed})
        if record is not None and self._metrics is not None:
            self._metrics.iteration([o.config.steps for o in record.requests], list(accepted_per_req))

    # -- per request ----------------------------------------------------------------------------
    def snapshot(self, rid: str) -> dict | None:
        """JSON-able Cascade figures of a running request (None if the plugin never saw it decode)."""
        return self.session.snapshot(rid) if self.session else None

    def finish(self, rid: str) -> None:
        last = self.session.finish(rid) if self.session else None
        if last is not None and self._metrics is not None:
            self._metrics.finished(last["utility"])


_RUNTIME: CascadeRuntime | None = None


def get_runtime() -> CascadeRuntime | None:
    return _RUNTIME


def start_runtime(settings: PluginSettings, initial_steps: int) -> CascadeRuntime:
    global _RUNTIME
    _RUNTIME = CascadeRuntime(settings, initial_steps)
    return _RUNTIME
