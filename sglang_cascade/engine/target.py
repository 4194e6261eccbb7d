"""The target model's forward over a batch of requests, each with its own cache and draft tree.

Weights and config come from a transformers Mixtral-class model (its module tree is read, its
forward is not used): a verify pass needs per-request tree masks over per-request KV caches, and
batch-invariant arithmetic (see batch_invariant), which the stock forward does not give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from sglang_cascade.engine.batch_invariant import linear
from sglang_cascade.engine.kv_cache import TargetKV
from sglang_cascade.engine.tree_attention import make_tree_attention


@dataclass
class Segment:
    """One request's rows in a forward: `tokens` at slots cache.cached + i, rope positions
    cache.cached + depths[i]; node i attends to committed slots and to nodes where mask[i] is True."""

    cache: TargetKV
    tokens: torch.Tensor        # [n] int64
    depths: torch.Tensor        # [n] int64
    mask: torch.Tensor          # [n, n] bool
    logit_rows: torch.Tensor    # rows whose logits are needed

    def to(self, device: torch.device) -> "Segment":
        return Segment(self.cache, self.tokens.to(device), self.depths.to(device), self.mask.to(device),
                       self.logit_rows.to(device))


@dataclass
class ForwardResult:
    logits: list[torch.Tensor]          # per segment [len(logit_rows), vocab]
    aux_hidden: list[torch.Tensor]      # per segment [n, num_aux * hidden]
    distinct_experts: list[int]         # per MoE layer, union over all rows of the forward


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 whatever the weights' dtype (bf16 on a GPU)."""
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return (weight * (xf * torch.rsqrt(variance + eps))).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TargetModel:
    """Reads a transformers MixtralForCausalLM (or any model with its module names) and runs it."""

    def __init__(self, model: PreTrainedModel, max_context: int, aux_layer_ids: list[int] | None = None,
                 attention_backend: str = "auto"):
        """The forward runs where the model's weights are (CPU or one CUDA device), in their dtype."""
        cfg = model.config
        if not hasattr(model.model.layers[0].mlp, "experts"):
            raise ValueError(f"target {type(model).__name__} is not a Mixtral-class MoE "
                             "(layers[i].mlp.gate / .experts); build one with scripts/build_default_moe.py")
        self.model = model.eval()
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.num_local_experts
        self.act = ACT2FN[cfg.hidden_act]
        self.max_context = max_context
        bad = [i for i in aux_layer_ids or [] if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"draft head asks for target layers {bad}, but the target has "
                             f"{self.num_layers} layers (0..{self.num_layers - 1}); retrain the head for this target")
        self.aux_layer_ids = list(aux_layer_ids or [])
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        positions = torch.arange(max_context, device=self.device)[None]
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32, device=self.device), positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)   # [max_context, head_dim]
        self.scale = self.head_dim ** -0.5
        self.tree_attention = make_tree_attention(attention_backend, self.num_heads, self.num_kv_heads,
                                                  self.head_dim, self.scale, self.device, self.dtype)

    def new_cache(self, capacity: int) -> TargetKV:
        return TargetKV(self.num_layers, self.num_kv_heads, self.head_dim, capacity,
                        self.tree_attention.kv_dtype, self.device)

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.model.embed_tokens

    @torch.no_grad()
    def forward(self, segments: list[Segment]) -> ForwardResult:
        """Segments' tensors may live on the CPU; logits come back as float32 on the CPU, aux_hidden
        stays on the model's device."""
        segments = [s.to(self.device) for s in segments]
        tokens = torch.cat([s.tokens for s in segments])
        positions = torch.cat([s.cache.cached + s.depths for s in segments])
        if int(positions.max()) >= self.max_context:
            raise ValueError(f"position {int(positions.max())} beyond the context length {self.max_context}")
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        bounds = torch.tensor([0] + [len(s.tokens) for s in segments]).cumsum(0).tolist()
        self.tree_attention.plan(segments)
        h = self.embed_tokens(tokens)
        captured, distinct = {}, []
        for layer_id, layer in enumerate(self.model.model.layers):
            x = _rms_norm(h, layer.input_layernorm.weight, self.eps)
            h = h + self._attention(layer_id, layer.self_attn, x, cos, sin, segments, bounds)
            x = _rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            moe_out, experts_used = self._moe(layer.mlp, x)
            h = h + moe_out
            distinct.append(experts_used)
            if layer_id in self.aux_layer_ids:
                captured[layer_id] = h
        h = _rms_norm(h, self.model.model.norm.weight, self.eps)
        logits, aux_hidden = [], []
        aux_all = torch.cat([captured[i] for i in self.aux_layer_ids], -1) if captured else None
        for seg, lo, hi in zip(segments, bounds[:-1], bounds[1:]):
            logits.append(linear(h[lo:hi][seg.logit_rows], self.model.lm_head.weight).float().cpu())
            aux_hidden.append(aux_all[lo:hi] if aux_all is not None else None)
        return ForwardResult(logits, aux_hidden, distinct)

    def _attention(self, layer_id, attn, x, cos, sin, segments, bounds) -> torch.Tensor:
        """Projections and rope here; the new rows' K/V go into each request's cache, then the tree
        attention (torch or FlashInfer) reads the caches."""
        rows = x.shape[0]
        q = linear(x, attn.q_proj.weight).view(rows, self.num_heads, self.head_dim)
        k = linear(x, attn.k_proj.weight).view(rows, self.num_kv_heads, self.head_dim)
        v = linear(x, attn.v_proj.weight).view(rows, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        for seg, lo, hi in zip(segments, bounds[:-1], bounds[1:]):
            start, cache = seg.cache.cached, seg.cache
            cache.k[layer_id][:, start:start + hi - lo] = k[lo:hi].transpose(0, 1).to(cache.k.dtype)
            cache.v[layer_id][:, start:start + hi - lo] = v[lo:hi].transpose(0, 1).to(cache.v.dtype)
        return linear(self.tree_attention.attend(layer_id, q, segments, bounds), attn.o_proj.weight)

    def _moe(self, moe, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mixtral routing (softmax, top-k, renormalise); each expert runs only on its rows, so the
        work and bytes grow with the distinct experts a batch touches, as on a real MoE."""
        probs = torch.softmax(linear(x, moe.gate.weight).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        used = torch.unique(experts).tolist()
        for e in used:
            rows, slot = torch.where(experts == e)
            gate, up = linear(x[rows], moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = linear(self.act(gate) * up, moe.experts.down_proj[e])
            out.index_add_(0, rows, (y * weights[rows, slot, None]).to(out.dtype))
        return out, len(used)
