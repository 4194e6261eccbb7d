"""Compile SGLang's multi-step draft selection for batches above 1 during the start-up warm-up.

SGLang's `_select_top_k_tokens_later` (every draft step after the first) is torch.compile'd with
dynamic shapes, and torch specialises a batch of 1: a server that first drafts 2+ steps for
several requests at once recompiles then, mid-serving (0.6 s on the CPU kit at batch 3). While
the runtime walks the tiers at start-up (runtime.py), the AROUND hook on that function also calls
it once on the same inputs doubled along the batch, so the batch > 1 graph exists before the
first user request. The extra call's results are discarded.
"""

from __future__ import annotations

import torch

from .runtime import get_runtime

_done = False


def select_top_k_later_hook(original, i, topk_p, topk_index, hidden_states, scores, topk):
    global _done
    runtime = get_runtime()
    if not _done and runtime is not None and runtime.warming_up and scores.shape[0] == 1:
        _done = True
        doubled = [None if t is None else torch.cat([t, t]) for t in (topk_p, topk_index, hidden_states, scores)]
        original(i, *doubled, topk)
    return original(i, topk_p, topk_index, hidden_states, scores, topk)
