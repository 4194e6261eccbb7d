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

Every eagerly run verify also keeps, per MoE layer, the expert ids its rows load after the rewrite
(and, for the iteration log, those they routed to); when the iteration completes, one presence
scatter over all layers counts the distinct experts per layer (the cost model's routing signal) and
one transfer brings them to the host (ExpertCounts.resolve): no work per layer beyond keeping a
reference, no host sync per layer. Verifies replayed from CUDA graphs run no Python and are not
counted.
"""

from __future__ import annotations

import torch

MAX_ROWS = 1 << 14   # verify rows (batch x draft tokens) the buffers cover; larger batches are not rewritten


class ExpertCounts:
    """One verify's expert ids per MoE layer, kept as the forward left them; counted in resolve()."""

    def __init__(self, num_experts: int, layers: list[int], loaded: list, routed: list):
        self.num_experts, self.layers, self._loaded, self._routed = num_experts, layers, loaded, routed

    def resolve(self) -> tuple[list[int], list[int]]:
        """(loaded, routed) distinct experts per layer in layer order (routed empty unless the iteration
        log asked for it): one presence scatter over all layers, one device-to-host transfer."""
        ids = torch.stack(self._loaded + self._routed).flatten(1)        # [layers, rows x top-k]
        ids = ids.where(ids >= 0, self.num_experts).long()                 # -1 (no expert) -> a spare column
        present = torch.zeros(ids.shape[0], self.num_experts + 1, dtype=torch.int32, device=ids.device)
        counts = present.scatter_(1, ids, 1)[:, :self.num_experts].sum(1).tolist()
        return counts[:len(self._loaded)], counts[len(self._loaded):]


class PrunedExperts:
    def __init__(self):
        self._keep = None       # bool [MAX_ROWS]: row kept (True outside a verify)
        self._src = None        # int64 [MAX_ROWS]: row whose experts a row takes (identity outside a verify)
        self._rows = 0          # rows of the verify in flight (0: none armed)
        self._cut = False       # whether any of them is cut (else the routing stands, and is only counted)
        self.num_experts = 0    # routed experts per layer (set once the model is known; 0: no counting)
        self.count_routed = False   # also count the experts rows routed to before the rewrite (iteration log)
        self._loaded: dict[int, torch.Tensor] = {}
        self._routed: dict[int, torch.Tensor] = {}

    def _buffers(self, device):
        if self._keep is None or self._keep.device != torch.device(device):
            self._keep = torch.ones(MAX_ROWS, dtype=torch.bool, device=device)
            self._src = torch.arange(MAX_ROWS, device=device)
        return self._keep, self._src

    def arm(self, budgets: list[int], width: int, device) -> None:
        """Mark, for the verify about to run, the rows past each request's budget (width rows each)."""
        rows, cut = len(budgets) * width, any(b + 1 < width for b in budgets)
        if rows > MAX_ROWS or not (self.num_experts or cut):
            return
        keep, src = self._buffers(device)
        col = torch.arange(width)
        kept = col[None, :] <= torch.tensor(budgets)[:, None]               # node j kept iff j <= budget
        index = torch.arange(rows).view(-1, width)
        keep[:rows].copy_(kept.view(-1), non_blocking=True)
        src[:rows].copy_(torch.where(kept, index, index[:, :1]).view(-1), non_blocking=True)
        self._rows, self._cut = rows, cut
        self._loaded, self._routed = {}, {}

    def disarm(self) -> ExpertCounts | None:
        """Restore the identity; return the verify's counts (None if none were taken)."""
        if self._rows:
            self._keep[:self._rows].fill_(True)
            self._src[:self._rows].copy_(torch.arange(self._rows, device=self._src.device), non_blocking=True)
        self._rows = 0
        layers = sorted(self._loaded)
        routed = [self._routed[k] for k in layers if k in self._routed] if self.count_routed else []
        counts = ExpertCounts(self.num_experts, layers, [self._loaded[k] for k in layers], routed) if layers else None
        self._loaded, self._routed = {}, {}
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
        counting = self.num_experts and self._rows and not capturing   # ids kept, counted at completion
        if not (self._cut or capturing):   # nothing cut: the routing stands (SGLang's buffer: copied)
            if counting:
                self._loaded[layer_id] = self._routed[layer_id] = ids[:self._rows].clone()
            return topk_output
        keep, src = keep[:ids.shape[0]], src[:ids.shape[0]]
        new_ids = torch.where(keep[:, None], ids, -1) if ids.is_cuda else ids[src]
        new = topk_output._replace(topk_ids=new_ids, topk_weights=weights * keep[:, None].to(weights.dtype))
        if counting:
            self._loaded[layer_id] = new_ids[:self._rows]
            if self.count_routed:
                self._routed[layer_id] = ids[:self._rows].clone()
        return new


ROUTING = PrunedExperts()


def topk_forward_hook(original, topk, *args, **kwargs):
    return ROUTING.rewrite(topk.layer_id, original(topk, *args, **kwargs))
