"""Tree attention of the target's forward: each request's rows attend to its committed KV and, inside
its draft tree, to themselves and their ancestors (Segment.mask).

Two implementations behind one interface (plan once per forward, then attend per layer):
- TorchTreeAttention, the CPU path: per request, masked softmax in batch_invariant.attention_dtype
  (float64) over the request's own cache, so a token's output does not depend on its batch.
- FlashInferTreeAttention, the GPU path: one FlashInfer ragged prefill call for the whole batch with a
  custom mask (the tree), as SGLang verifies EAGLE trees. It is not batch-invariant: bf16 kernels may
  flip a greedy token at a near-tie, the standard SGLang's own verify meets.
The caller has already written the forward's new K/V into each request's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_cascade.engine import batch_invariant


@dataclass
class RaggedLayout:
    """The batch as FlashInfer's ragged prefill takes it: request b's query rows are
    qo_indptr[b]:qo_indptr[b+1], its KV rows (committed slots, then its new rows) kv_indptr[b]:kv_indptr[b+1];
    custom_mask concatenates, per request, its [query rows, KV rows] mask flattened row-major."""

    qo_indptr: torch.Tensor     # int32 [batch + 1]
    kv_indptr: torch.Tensor     # int32 [batch + 1]
    custom_mask: torch.Tensor   # bool [sum_b q_b * kv_b]


def request_mask(seg) -> torch.Tensor:
    """[n, cached + n] bool: a segment's rows see every committed slot and, among the new rows, their tree's."""
    n, cached = len(seg.tokens), seg.cache.cached
    mask = torch.ones((n, cached + n), dtype=torch.bool, device=seg.mask.device)
    mask[:, cached:] = seg.mask
    return mask


def ragged_layout(segments, device: torch.device | str = "cpu") -> RaggedLayout:
    """Indptrs and tree mask of a forward's segments (see target.Segment)."""
    qo, kv, masks = [0], [0], []
    for seg in segments:
        n, cached = len(seg.tokens), seg.cache.cached
        qo.append(qo[-1] + n)
        kv.append(kv[-1] + cached + n)
        masks.append(request_mask(seg).flatten())
    return RaggedLayout(torch.tensor(qo, dtype=torch.int32, device=device),
                        torch.tensor(kv, dtype=torch.int32, device=device),
                        torch.cat(masks).to(device))


class TorchTreeAttention:
    """Per-request masked attention in attention_dtype (float64 on the CPU, see batch_invariant)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.groups = num_heads // num_kv_heads
        self.scale, self.kv_dtype = scale, dtype
        self.masks: list[torch.Tensor] = []

    def plan(self, segments) -> None:
        """Each request's [n * groups, cached + n] mask, rows grouped as the attention below lays q out."""
        self.masks = [request_mask(seg).repeat_interleave(self.groups, dim=0) for seg in segments]

    def attend(self, layer_id: int, q: torch.Tensor, segments, bounds: list[int]) -> torch.Tensor:
        """q [rows, heads, head_dim] -> [rows, heads * head_dim] in q's dtype."""
        out = q.new_empty((q.shape[0], self.num_heads * self.head_dim))
        for seg, lo, hi, mask in zip(segments, bounds[:-1], bounds[1:], self.masks):
            n, end = hi - lo, seg.cache.cached + hi - lo
            keys, values = seg.cache.k[layer_id][:, :end], seg.cache.v[layer_id][:, :end]
            qs = q[lo:hi].to(self.kv_dtype).view(n, self.num_kv_heads, self.groups, self.head_dim)
            qs = qs.permute(1, 0, 2, 3).reshape(self.num_kv_heads, n * self.groups, self.head_dim)
            scores = (qs @ keys.transpose(1, 2)) * self.scale
            scores.masked_fill_(~mask, float("-inf"))
            o = torch.softmax(scores, dim=-1) @ values
            o = o.view(self.num_kv_heads, n, self.groups, self.head_dim).permute(1, 0, 2, 3)
            out[lo:hi] = o.reshape(n, -1).to(out.dtype)
        return out


class FlashInferTreeAttention:
    """FlashInfer's BatchPrefillWithRaggedKVCacheWrapper with the batch's tree mask as custom_mask.

    The caches stay per request (contiguous, [kv_heads, slots, head_dim]); each layer gathers the
    batch's KV rows into FlashInfer's ragged NHD layout, a copy as large as what attention reads.
    """

    WORKSPACE_BYTES = 128 * 1024 * 1024

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, device: torch.device,
                 dtype: torch.dtype):
        try:
            import flashinfer
        except ImportError as e:
            raise RuntimeError("--attention-backend flashinfer needs the flashinfer package "
                               "(pip install flashinfer-python, matching your CUDA torch), or use "
                               "--attention-backend torch") from e
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"FlashInfer attention runs float16 or bfloat16, not {dtype}; "
                             f"load the target with --dtype bfloat16")
        workspace = torch.zeros(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.device, self.kv_dtype = scale, device, dtype

    def plan(self, segments) -> None:
        """Plans the batch's layout once per forward; attend() gathers each request's first kv_ends slots."""
        self.kv_ends = [s.cache.cached + len(s.tokens) for s in segments]
        layout = ragged_layout(segments, self.device)
        self.wrapper.plan(layout.qo_indptr, layout.kv_indptr, self.num_heads, self.num_kv_heads, self.head_dim,
                          custom_mask=layout.custom_mask, causal=False, sm_scale=self.scale,
                          q_data_type=self.kv_dtype, kv_data_type=self.kv_dtype)

    def attend(self, layer_id: int, q: torch.Tensor, segments, bounds: list[int]) -> torch.Tensor:
        k = torch.cat([s.cache.k[layer_id][:, :end].transpose(0, 1) for s, end in zip(segments, self.kv_ends)])
        v = torch.cat([s.cache.v[layer_id][:, :end].transpose(0, 1) for s, end in zip(segments, self.kv_ends)])
        out = self.wrapper.run(q.to(self.kv_dtype).contiguous(), k, v)
        return out.reshape(q.shape[0], -1).to(q.dtype)


ATTENTION_BACKENDS = ("auto", "torch", "flashinfer")


def make_tree_attention(backend: str, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                        device: torch.device, model_dtype: torch.dtype):
    """auto: FlashInfer on a CUDA device where it imports, else torch. The result's kv_dtype is the KV
    cache's: float64 on the CPU (batch invariance), the model's dtype under FlashInfer, else float32."""
    if backend == "auto":
        backend = "flashinfer" if device.type == "cuda" and _flashinfer_importable() else "torch"
    if backend == "flashinfer":
        if device.type != "cuda":
            raise ValueError(f"--attention-backend flashinfer runs on a CUDA device, the target is on {device}; "
                             f"pass --device cuda or --attention-backend torch")
        return FlashInferTreeAttention(num_heads, num_kv_heads, head_dim, scale, device, model_dtype)
    kv_dtype = batch_invariant.attention_dtype if device.type == "cpu" else torch.float32
    return TorchTreeAttention(num_heads, num_kv_heads, head_dim, scale, kv_dtype)


def _flashinfer_importable() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True
