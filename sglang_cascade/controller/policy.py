"""SpecPolicy: what an engine asks of a speculation policy, written down.

The portable engine and the SGLang plugin drive a policy through these calls only, so Cascade and
the baselines (SGLang's adaptive steps) are interchangeable behind them.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

from .types import IterationRecord, SpecConfig


@runtime_checkable
class SpecPolicy(Protocol):
    name: str   # what reports and meta_info call the policy

    def add_request(self, rid: str) -> None:
        """A request joins the running batch (decide() adds unknown rids itself)."""

    def finish_request(self, rid: str) -> None:
        """A request finished or was aborted; unknown rids are ignored."""

    def decide(self, rids: Iterable[str]) -> dict[str, SpecConfig]:
        """Each running request's configuration for the next iteration."""

    def plain_ahead(self, rids: Iterable[str], pending: int) -> bool:
        """Whether decide() keeps every one of rids plain after `pending` more observe() calls (an engine
        may then skip work only speculation needs); False whenever unsure."""

    def observe(self, record: IterationRecord) -> None:
        """One finished iteration, as measured; requests the policy never decided for are not its to learn
        from (their time still counts in the batch)."""

    def request_stats(self, rid: str) -> dict:
        """JSON-able state of one running request (KeyError if unknown)."""

    def summary(self) -> dict:
        """JSON-able aggregate of the run so far."""
