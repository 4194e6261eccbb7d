"""Per-request caches: the target's KV (float64 on the CPU, see batch_invariant), the fused target features the
drafter consumes, and the drafter's own KV."""

from __future__ import annotations

import torch

from sglang_cascade.engine import batch_invariant


class TargetKV:
    """Contiguous KV slots for one request. Slots [0, cached) hold committed tokens; a verify writes its
    tree nodes after them and `commit` keeps the accepted path."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = batch_invariant.attention_dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.cached = 0

    def commit(self, node_indices: list[int]) -> None:
        """Keep the KV of tree nodes `node_indices` (root first, in path order) as the next slots."""
        start = self.cached
        if node_indices != list(range(len(node_indices))):
            src = torch.tensor(node_indices, device=self.k.device) + start
            dst = torch.arange(len(node_indices), device=self.k.device) + start
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
        self.cached += len(node_indices)


class DraftKV:
    """The draft head's KV for one request. Slot j holds the pair (target feature of token j-1, token j),
    so slots [1, filled] are committed; drafting writes tree nodes after them as scratch."""

    def __init__(self, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.k = torch.zeros((num_kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((num_kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.filled = 0


class RequestCache:
    """Everything one request keeps between iterations."""

    def __init__(self, target: TargetKV, hidden_size: int | None, draft: DraftKV | None):
        self.target = target
        self.draft = draft
        # fused target features of every token in the target cache (the drafter's input)
        self.features = (torch.zeros((target.capacity, hidden_size), device=target.k.device)
                         if hidden_size else None)
