"""Lossless acceptance of a verified draft tree.

Greedy: walk down while a child carries the target's argmax. Sampling: the drafts are deterministic
proposals (top-k of the draft head), so each child token t is accepted with the current target
probability p(t); on rejection p(t) is zeroed and p renormalised before the next sibling, and when
no child is accepted the bonus token is drawn from what is left. This is recursive rejection
sampling with point-mass proposals, so every emitted token is distributed exactly as the target's
(tests/test_acceptance.py checks it statistically).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_cascade.engine.tree import DraftTree


@dataclass
class SamplingParams:
    """SGLang's names; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows of logits -> the distributions plain sampling would draw from (temperature, top-k, top-p)."""
    logits = logits.double() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Returns the accepted path (node indices, root first) and the bonus token."""
    children = tree.children()
    best = logits.argmax(-1).tolist()
    node, path = 0, [0]
    while True:
        nxt = next((c for c in children[node] if tree.tokens[c] == best[node]), None)
        if nxt is None:
            return path, best[node]
        node = nxt
        path.append(node)


def accept_sampling(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """Recursive rejection sampling over the tree; `probs` from target_probs, one row per node."""
    children = tree.children()
    node, path = 0, [0]
    p = probs[0].clone()
    while True:
        for child in children[node]:
            token = tree.tokens[child]
            if torch.rand((), generator=generator, dtype=torch.float64) < p[token]:
                node = child
                path.append(node)
                p = probs[node].clone()
                break
            p[token] = 0.0
            p = p / p.sum()
        else:
            return path, int(torch.multinomial(p, 1, generator=generator))
