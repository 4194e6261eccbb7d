"""Row-batch-invariant arithmetic, so a token's logits do not depend on what it is batched with.

Greedy speculative decoding is only token-identical to plain decoding if the target computes the
same float values for a token whether it is verified in a tree of 8 nodes beside other requests or
decoded alone. On CPU, MKL computes the rows of a GEMM that fall in a remainder block of fewer than 4 rows with
another kernel, and its attention GEMMs change with the key count; so linear layers always see a
multiple of ROW_MULTIPLE rows (padding with zero rows), and attention runs in float64 (`attention_dtype`) and is rounded back to
float32, which makes the float32 result independent of the key layout except with negligible
probability. tests/test_batch_invariance.py checks these properties on the machine it runs on.
"""

from __future__ import annotations

import torch

ROW_MULTIPLE = 4
attention_dtype = torch.float64


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T whose per-row result is the same for any number of rows."""
    rows = x.shape[0]
    if rows % ROW_MULTIPLE == 0:
        return torch.nn.functional.linear(x, weight)
    padded = x.new_zeros((rows + (-rows) % ROW_MULTIPLE, x.shape[1]))
    padded[:rows] = x
    return torch.nn.functional.linear(padded, weight)[:rows]
