"""SpecSession: what every engine keeps around a speculation policy, written once.

An engine (the portable one, or SGLang's through the plugin) drives one decode iteration as

    configs = session.begin(rids, seq_lens)   # before drafting: each request's configuration
    ...                                         # draft, verify, accept: the engine's own mechanism
    session.complete(accepted, ...)             # once the accept counts are known

and otherwise only registers requests (`add`, with a request's own pinned configuration) and ends
them (`finish`). The session keeps the per-request figures, the open iterations, the
IterationRecord the policy learns from, one `meta_info` layout (`snapshot`) and one iteration-log
line, so the adapters keep nothing of the kind themselves.

Open iterations form a FIFO: under SGLang's overlap scheduler the next begin() precedes the previous
completion. An iteration's wall time runs from the later of its begin and the previous completion,
so overlapped iterations are not counted twice.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .policy import SpecPolicy
from .types import PLAIN, IterationRecord, RequestObservation, SpecConfig

HISTORY = 64   # configuration changes kept per request in its snapshot


@dataclass
class RequestFigures:
    """What one request ran, counted by the engine (a policy's own stats may see only part of it)."""

    iterations: int = 0
    speculative_iterations: int = 0
    drafts_proposed: int = 0
    drafts_accepted: int = 0
    beyond_budget: int = 0     # iterations it accepted more drafts than its configuration's depth
    config: str = PLAIN.label()
    config_history: list = field(default_factory=list)   # [its own decode iteration, config label]

    def record(self, chosen: SpecConfig, accepted: int) -> None:
        label = chosen.label()
        if label != self.config or not self.config_history:
            self.config = label
            self.config_history.append([self.iterations, label])
            del self.config_history[:-HISTORY]
        self.iterations += 1
        self.speculative_iterations += chosen.speculative
        self.drafts_proposed += chosen.draft_tokens - 1
        self.drafts_accepted += accepted
        self.beyond_budget += accepted > chosen.steps


@dataclass
class _Open:
    began: float
    rids: list
    configs: list
    seq_lens: list
    learn: bool
    note: object = None   # the adapter's own per-iteration record (oldest_note)


def _same(obj):
    return obj


class SpecSession:
    """One policy (None: every request runs `default`) and the bookkeeping around it.

    broadcast(obj) must return the same obj on every rank that runs the batch (tensor-parallel
    ranks must run the same configurations); log(entry) receives each completed iteration's line.
    """

    def __init__(self, policy: SpecPolicy | None, default: SpecConfig = PLAIN, *,
                 broadcast: Callable = _same, log: Callable[[dict], None] | None = None):
        self.policy = policy
        self.default = default
        self.figures: dict[str, RequestFigures] = {}
        self.decisions = 0          # iterations planned
        self.digest = ""            # hash chain over every iteration's configurations (ranks compare it)
        self._pinned: dict[str, SpecConfig] = {}
        self._open: deque[_Open] = deque()
        self._last_completion = 0.0
        self._broadcast = broadcast
        self._log = log

    # -- requests -------------------------------------------------------------------------------
    def add(self, rid: str, pinned: SpecConfig | None = None) -> None:
        """A request joins; with `pinned` it runs that configuration and the policy never sees it
        (the policy would otherwise book its results to a rung it did not run). Requests that reach
        begin() unannounced are the policy's."""
        self.figures.setdefault(rid, RequestFigures())
        if pinned is not None:
            self._pinned[rid] = pinned
        elif self.policy is not None:
            self.policy.add_request(rid)

    def snapshot(self, rid: str) -> dict | None:
        """The request's figures as meta_info shows them; None unless the policy decides for it."""
        fig = self.figures.get(rid)
        if fig is None or self.policy is None or rid in self._pinned:
            return None
        try:
            state = self.policy.request_stats(rid)
        except KeyError:
            state = {}
        return {"policy": self.policy.name, "config": fig.config, "config_history": [list(x) for x in fig.config_history],
                "phase": state.get("phase"), "utility": state.get("utility", {}),
                "decode_iterations": fig.iterations, "speculative_iterations": fig.speculative_iterations,
                "drafts_proposed": fig.drafts_proposed, "drafts_accepted": fig.drafts_accepted,
                "accept_rate": fig.drafts_accepted / fig.drafts_proposed if fig.drafts_proposed else 0.0,
                "accepted_beyond_budget": fig.beyond_budget}

    def finish(self, rid: str) -> dict | None:
        """A request finished or was aborted; returns its last snapshot (unknown rids: None)."""
        last = self.snapshot(rid)
        self.figures.pop(rid, None)
        self._pinned.pop(rid, None)
        if self.policy is not None:
            self.policy.finish_request(rid)
        return last

    # -- one iteration ------------------------------------------------------------------------
    def begin(self, rids: list[str], seq_lens: list[int], *, learn: bool = True, note=None) -> list[SpecConfig]:
        """Each request's configuration for the iteration that starts now. learn=False: every request
        runs plain and the policy neither decides nor observes (an engine's own warm-up). note: the
        adapter's own record of the iteration, handed back by oldest_note until it completes."""
        for rid in rids:
            if rid not in self.figures:
                self.add(rid)
        if learn:
            pinned = self._pinned
            free = [rid for rid in rids if rid not in pinned]
            decided = self.policy.decide(free) if self.policy is not None and free else {}
            configs = [pinned[rid] if rid in pinned else decided.get(rid, self.default) for rid in rids]
            configs = self._broadcast(configs)
        else:
            configs = [PLAIN] * len(rids)
        self._open.append(_Open(time.perf_counter(), list(rids), configs, list(seq_lens), learn, note))
        self.decisions += 1
        self.digest = hashlib.sha1(f"{self.digest}{[c.label() for c in configs]};".encode()).hexdigest()
        return configs

    def plain_ahead(self) -> bool:
        """Whether every request of the latest planned iteration stays plain at the next decision too,
        whatever the iterations still open report (an engine may then skip work only speculation needs);
        the same answer on every rank."""
        it = self._open[-1] if self._open else None
        if it is None or not it.learn or self.policy is None or any(c.speculative for c in it.configs):
            return False
        if any(rid in self._pinned for rid in it.rids):
            return False
        return self._broadcast(self.policy.plain_ahead(it.rids, pending=len(self._open)))

    @property
    def latest(self) -> list[SpecConfig]:
        """The configurations of the latest planned iteration ([] if none is open)."""
        return self._open[-1].configs if self._open else []

    @property
    def oldest_note(self):
        """The note of the iteration the next complete() closes (None if none is open)."""
        return self._open[0].note if self._open else None

    def complete(self, accepted: list[int], *, tokens_verified: list[int] | None = None, rows: int = 0,
                 distinct_experts: list[int] | None = None, draft_s: float = 0.0,
                 extra: dict | None = None) -> IterationRecord | None:
        """The oldest open iteration verified: `accepted` drafts per request, in begin()'s order.

        tokens_verified: tree nodes verified per request (default: each configuration's draft tokens);
        rows: where verify is uniform-width, the rows the target computed per request; distinct_experts:
        per MoE layer, over the verify; extra: engine-specific fields for the log line. Returns the
        record the policy observed (None if nothing was open or the batch does not match).
        """
        if not self._open:
            return None
        it = self._open.popleft()
        now = time.perf_counter()
        wall = now - max(it.began, self._last_completion)
        self._last_completion = now
        if len(accepted) != len(it.rids):
            return None
        sizes = tokens_verified or [c.draft_tokens for c in it.configs]
        observations = [RequestObservation(rid, c, a, n, s, rows)
                        for rid, c, a, n, s in zip(it.rids, it.configs, accepted, sizes, it.seq_lens)]
        for o in observations:
            fig = self.figures.get(o.rid)
            if fig is not None:
                fig.record(o.config, o.accepted)
        record = IterationRecord(wall, observations, list(distinct_experts or []), draft_s)
        if it.learn and self.policy is not None:
            self.policy.observe(record)
        if self._log is not None:
            self._log(self._line(record, extra))
        return record

    def _line(self, record: IterationRecord, extra: dict | None) -> dict:
        obs = record.requests
        line = {"t": time.time(), "wall_s": record.wall_time_s, "draft_s": record.draft_time_s,
                "batch": len(obs), "tokens": sum(o.accepted + 1 for o in obs), "rids": [o.rid for o in obs],
                "configs": [o.config.label() for o in obs], "tree_sizes": [o.tokens_verified for o in obs],
                "accepted": [o.accepted for o in obs], "seq_lens": [o.seq_len for o in obs],
                "distinct_experts": record.distinct_experts}
        cost_model = getattr(self.policy, "cost_model", None)
        if cost_model is not None:
            line["routing_eta"] = cost_model.eta
        return {**line, **(extra or {})}
