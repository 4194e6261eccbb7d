"""Draft trees as the target verifies them: nodes in topological order, root first."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """A request's verify input. Node 0 is the root (the last accepted token, not yet in the target's
    KV cache); every other node's parent comes before it."""

    tokens: list[int]
    parents: list[int]          # parents[0] == -1

    @classmethod
    def root_only(cls, token: int) -> "DraftTree":
        return cls([token], [-1])

    @classmethod
    def chain(cls, tokens: list[int]) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        out = []
        for p in self.parents:
            out.append(0 if p < 0 else out[p] + 1)
        return out

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for node, p in enumerate(self.parents):
            if p >= 0:
                kids[p].append(node)
        return kids

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: node i may attend to node j (j is i or an ancestor of i)."""
        n = len(self.tokens)
        mask = torch.zeros((n, n), dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask
