"""Verify rows cut by a request's budget pull no experts: the bytes that make speculation cost on an MoE.

runtime.prune() unlinks each request's chain past its budget, but SGLang's verify is uniform-width:
the target still runs every row, and each cut row routes to its own top-k experts, so the MoE kernels
load weights for rows whose results can never be accepted. The AROUND hook on TopK.forward rewrites
the router's choice for cut rows after expert selection:
- CUDA kernels skip expert id -1 (SGLang pads rows so): cut rows get id -1 and weight 0;
- SGLang's CPU path (moe_forward_native scatters ids into a count table, so -1 cannot be indexed)
  gets the ids of the request's root row, which is always verified, with weight 0: experts the
  batch loads anyway.
Lossless: a cut row descends from the request's cut point, so no kept row attends to it, and
acceptance never reads its logits.

The row mask lives in persistent device buffers that hold the identity outside a verify, so the
rewrite is the same tensor program on every call and only the buffers' contents change - what a
captured CUDA graph needs. (The CUDA variant is written for SGLang's GPU kernels; this project's
tests run the CPU variant.)
"""

from __future__ import annotations

import torch

MAX_ROWS = 1 << 14   # verify rows (batch x draft tokens) the buffers cover; larger batches are not rewritten


class PrunedExperts:
    def __init__(self):
        self._keep = None       # bool [MAX_ROWS]: row kept (True outside a verify)
        self._src = None        # int64 [MAX_ROWS]: row whose experts a row takes (identity outside a verify)
        self._rows = 0          # rows of the verify in flight (0: none armed)
        self.count = False      # record distinct experts per layer (a host sync per layer: logging only)
        self._counts: dict[int, tuple[int, int]] = {}

    def _buffers(self, device):
        if self._keep is None or self._keep.device != torch.device(device):
            self._keep = torch.ones(MAX_ROWS, dtype=torch.bool, device=device)
            self._src = torch.arange(MAX_ROWS, device=device)
        return self._keep, self._src

    def arm(self, budgets: list[int], width: int, device) -> None:
        """Mark, for the verify about to run, the rows past each request's budget (width rows each)."""
        rows = len(budgets) * width
        cut = any(b + 1 < width for b in budgets)
        if rows > MAX_ROWS or not (cut or self.count):
            return
        keep, src = self._buffers(device)
        col = torch.arange(width)
        kept = col[None, :] <= torch.tensor(budgets)[:, None]               # node j kept iff j <= budget
        index = torch.arange(rows).view(-1, width)
        keep[:rows].copy_(kept.view(-1), non_blocking=True)
        src[:rows].copy_(torch.where(kept, index, index[:, :1]).view(-1), non_blocking=True)
        self._rows = rows
        self._counts = {}

    def disarm(self) -> dict[int, tuple[int, int]]:
        """Restore the identity; return {layer: (experts routed, experts loaded)} if counted."""
        if self._rows:
            self._keep[:self._rows].fill_(True)
            self._src[:self._rows].copy_(torch.arange(self._rows, device=self._src.device), non_blocking=True)
        self._rows = 0
        counts, self._counts = self._counts, {}
        return counts

    def rewrite(self, layer_id: int, topk_output):
        """The router's output with cut rows' experts replaced (unchanged outside an armed verify)."""
        if not hasattr(topk_output, "_replace"):   # packed formats of some GPU backends: left as routed
            return topk_output
        ids, weights = topk_output.topk_ids, topk_output.topk_weights
        capturing = ids.is_cuda and torch.cuda.is_current_stream_capturing()
        # made on the first call: SGLang runs each CUDA graph's forward eagerly before capturing it, so
        # the buffers exist outside every graph (made inside one, each replay would re-initialise them)
        keep, src = self._buffers(ids.device)
        if not (self._rows or capturing) or ids.shape[0] > MAX_ROWS:
            return topk_output
        keep, src = keep[:ids.shape[0]], src[:ids.shape[0]]
        new_ids = torch.where(keep[:, None], ids, -1) if ids.is_cuda else ids[src]
        new = topk_output._replace(topk_ids=new_ids, topk_weights=weights * keep[:, None].to(weights.dtype))
        if self.count and self._rows and not capturing:
            live = new_ids[:self._rows]
            self._counts[layer_id] = (int(ids[:self._rows].unique().numel()), int(live[live >= 0].unique().numel()))
        return new


ROUTING = PrunedExperts()


def topk_forward_hook(original, topk, *args, **kwargs):
    return ROUTING.rewrite(topk.layer_id, original(topk, *args, **kwargs))
