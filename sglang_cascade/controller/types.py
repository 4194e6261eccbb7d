"""Values exchanged between an engine (portable or SGLang) and the Cascade controller.

Pure Python on purpose: the controller must import without torch or sglang.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class SpecConfig:
    """One speculative configuration of an EAGLE tree.

    steps: draft depth (0 = plain decoding, the paper's K=0); topk: children kept per level;
    draft_tokens: tree nodes verified by the target, the root (last accepted token) included,
    so plain decoding verifies 1 and a chain of `steps` verifies steps + 1.
    """

    steps: int
    topk: int = 1
    draft_tokens: int = 0

    def __post_init__(self):
        if self.draft_tokens == 0:
            object.__setattr__(self, "draft_tokens", self.steps + 1 if self.steps else 1)
        if self.steps < 0 or self.topk < 1:
            raise ValueError(f"invalid speculative config {self}: steps >= 0 and topk >= 1 required")
        if self.steps == 0 and (self.topk != 1 or self.draft_tokens != 1):
            raise ValueError(f"invalid speculative config {self}: steps 0 means plain decoding (topk 1, 1 token)")
        max_nodes = 1 + sum(self.topk ** (i + 1) if i == 0 else self.topk * self.topk for i in range(self.steps))
        if self.steps and not (2 <= self.draft_tokens <= max_nodes):
            raise ValueError(
                f"invalid speculative config {self}: draft_tokens must be in [2, {max_nodes}] "
                f"for steps={self.steps}, topk={self.topk}")

    @property
    def speculative(self) -> bool:
        return self.steps > 0

    def label(self) -> str:
        return "plain" if not self.steps else f"s{self.steps}k{self.topk}n{self.draft_tokens}"

    @classmethod
    def parse(cls, text: str) -> "SpecConfig":
        """Parse 'STEPSxTOPKxTOKENS' (e.g. '3x1x4'; '0' = plain)."""
        parts = text.strip().lower().split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"cannot parse speculative config {text!r}: expected STEPSxTOPKxTOKENS, e.g. 3x1x4")
        if not 1 <= len(nums) <= 3:
            raise ValueError(f"cannot parse speculative config {text!r}: expected STEPSxTOPKxTOKENS, e.g. 3x1x4")
        return cls(*nums)


PLAIN = SpecConfig(0)


@dataclass
class RequestObservation:
    """What one request did in one engine iteration."""

    rid: str
    config: SpecConfig        # configuration it ran with this iteration
    accepted: int             # draft tokens accepted (tokens emitted = accepted + 1)
    tokens_verified: int      # tree nodes the target verified for it (1 when plain)
    seq_len: int              # tokens in its KV cache before this iteration
    rows: int = 0             # rows the target computed for it where verify is uniform-width (SGLang: the
                              # batch's deepest chain, nodes past its own cut); 0: tokens_verified


@dataclass
class IterationRecord:
    """One engine iteration (draft + verify for the whole batch), as measured."""

    wall_time_s: float                                  # whole iteration, drafting included
    requests: list[RequestObservation]
    distinct_experts: list[int] = field(default_factory=list)  # per MoE layer, over the batch's verify
    draft_time_s: float = 0.0
