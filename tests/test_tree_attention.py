"""The engine's tree attention backends.

FlashInfer needs a CUDA GPU, which these machines lack, so the FlashInfer backend's own code (the
ragged layout it plans, the KV it gathers, the output it reshapes) runs here against a stand-in for
FlashInfer's BatchPrefillWithRaggedKVCacheWrapper: a direct torch evaluation of what FlashInfer
documents that call to compute (per request, query rows attend to the KV rows the flattened custom
mask allows; query head h reads KV head h // (heads / kv_heads)). Its output must equal the torch
backend's, the one the CPU engine runs.
"""

import pytest
import torch

from sglang_cascade.engine.config import EngineConfig
from sglang_cascade.engine.kv_cache import TargetKV
from sglang_cascade.engine.target import Segment
from sglang_cascade.engine.tree import DraftTree
from sglang_cascade.engine.tree_attention import (FlashInferTreeAttention, TorchTreeAttention, make_tree_attention,
                                                  ragged_layout)

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 8, 2
SCALE = HEAD_DIM ** -0.5


class RaggedPrefillStandIn:
    """Stand-in for flashinfer.BatchPrefillWithRaggedKVCacheWrapper (no GPU here): plan() keeps the
    layout, run() evaluates the documented result in float64."""

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim, *, custom_mask, causal, sm_scale,
             q_data_type, kv_data_type):
        assert qo_indptr.dtype == kv_indptr.dtype == torch.int32 and custom_mask.dtype == torch.bool
        assert not causal and (num_qo_heads, num_kv_heads, head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
        self.qo, self.kv, self.mask, self.scale = qo_indptr.tolist(), kv_indptr.tolist(), custom_mask, sm_scale
        self.dtype = q_data_type

    def run(self, q, k, v):
        assert q.shape[1:] == (HEADS, HEAD_DIM) and k.shape[1:] == v.shape[1:] == (KV_HEADS, HEAD_DIM)
        assert q.dtype == k.dtype == self.dtype and q.shape[0] == self.qo[-1] and k.shape[0] == self.kv[-1]
        out, offset = torch.empty_like(q), 0
        group = HEADS // KV_HEADS
        for b in range(len(self.qo) - 1):
            qs, ks, vs = (t.double() for t in (q[self.qo[b]:self.qo[b + 1]], k[self.kv[b]:self.kv[b + 1]],
                                              v[self.kv[b]:self.kv[b + 1]]))
            n, m = qs.shape[0], ks.shape[0]
            mask = self.mask[offset:offset + n * m].view(n, m)
            offset += n * m
            for h in range(HEADS):
                scores = (qs[:, h] @ ks[:, h // group].T) * self.scale
                scores.masked_fill_(~mask, float("-inf"))
                out[self.qo[b]:self.qo[b + 1], h] = (torch.softmax(scores, -1) @ vs[:, h // group]).to(q.dtype)
        assert offset == self.mask.numel()
        return out


def _segments(dtype):
    """Three requests: a prefill chain, a branching tree over a long cache, a lone root."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(0, DraftTree.chain([1, 2, 3, 4, 5])),
              (9, DraftTree([7, 8, 9, 10, 11, 12], [-1, 0, 0, 1, 1, 2])),
              (4, DraftTree.root_only(6))]
    segments = []
    for cached, tree in shapes:
        cache = TargetKV(LAYERS, KV_HEADS, HEAD_DIM, 32, dtype)
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen))   # committed slots and the new rows' KV
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
        cache.cached = cached
        segments.append(Segment(cache, torch.tensor(tree.tokens), torch.tensor(tree.depths()),
                                tree.ancestor_mask(), torch.arange(len(tree))))
    return segments


def _flashinfer_on_stand_in(dtype) -> FlashInferTreeAttention:
    backend = object.__new__(FlashInferTreeAttention)   # its __init__ imports flashinfer and needs CUDA
    backend.wrapper = RaggedPrefillStandIn()
    backend.num_heads, backend.num_kv_heads, backend.head_dim = HEADS, KV_HEADS, HEAD_DIM
    backend.scale, backend.device, backend.kv_dtype = SCALE, torch.device("cpu"), dtype
    return backend


def test_ragged_layout_concatenates_each_requests_row_major_mask():
    segments = _segments(torch.float64)
    layout = ragged_layout(segments)
    assert layout.qo_indptr.tolist() == [0, 5, 11, 12]
    assert layout.kv_indptr.tolist() == [0, 5, 20, 25]
    assert layout.custom_mask.numel() == 5 * 5 + 6 * 15 + 1 * 5
    tree = layout.custom_mask[25:25 + 6 * 15].view(6, 15)
    assert tree[:, :9].all()                                   # every node sees the committed cache
    assert tree[5, 9:].tolist() == [True, False, True, False, False, True]   # node 5: itself, parent 2, root
    assert layout.custom_mask[:25].view(5, 5).equal(torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_flashinfer_backend_feeds_the_same_attention_as_the_torch_backend(dtype):
    segments, reference = _segments(dtype), _segments(torch.float64)
    for seg in reference:   # the same values, rounded as the backend under test stores them
        seg.cache.k.copy_(seg.cache.k.to(dtype))
        seg.cache.v.copy_(seg.cache.v.to(dtype))
    bounds = [0, 5, 11, 12]
    q = torch.randn((12, HEADS, HEAD_DIM), generator=torch.Generator().manual_seed(1)).to(dtype)
    torch_backend = TorchTreeAttention(HEADS, KV_HEADS, HEAD_DIM, SCALE, torch.float64)
    torch_backend.plan(reference)
    flash = _flashinfer_on_stand_in(dtype)
    flash.plan(segments)
    for layer in range(LAYERS):
        expected = torch_backend.attend(layer, q.double(), reference, bounds)
        got = flash.attend(layer, q, segments, bounds)
        assert got.shape == (12, HEADS * HEAD_DIM) and got.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 2e-2
        assert torch.allclose(got.double(), expected, atol=tol, rtol=tol)


def test_backend_choice_and_its_errors():
    cpu = torch.device("cpu")
    auto = make_tree_attention("auto", HEADS, KV_HEADS, HEAD_DIM, SCALE, cpu, torch.float32)
    assert isinstance(auto, TorchTreeAttention) and auto.kv_dtype == torch.float64
    with pytest.raises(ValueError, match="--attention-backend flashinfer runs on a CUDA device.*--device cuda"):
        make_tree_attention("flashinfer", HEADS, KV_HEADS, HEAD_DIM, SCALE, cpu, torch.bfloat16)


def test_engine_device_and_dtype_flags_fail_clearly():
    with pytest.raises(ValueError, match="--dtype must be one of"):
        EngineConfig(dtype="float8")
    with pytest.raises(ValueError, match="--attention-backend must be one of"):
        EngineConfig(attention_backend="sdpa")
    with pytest.raises(ValueError, match="not a torch device"):
        EngineConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU.*--device cpu"):
            EngineConfig(device="cuda")
    assert EngineConfig().torch_dtype(torch.device("cpu")) == torch.float32
    assert EngineConfig().torch_dtype(torch.device("cuda")) == torch.bfloat16
