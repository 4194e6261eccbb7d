"""EAGLE-3 draft head in plain torch, saved and loaded in SGLang 0.5.23's `LlamaForCausalLMEagle3` layout.

One head serves both engines: SGLang loads our checkpoints with `--speculative-draft-model-path`, and
the portable engine runs the same arithmetic through this module (it owns the KV cache and the mask and
passes them in as `attend`). Parameter names equal the checkpoint's tensor names, so saving is a
state_dict dump. Token embeddings belong to the target (SGLang shares them), so the head has none.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS = "model.safetensors"
SAVE_DTYPE = torch.bfloat16


@dataclass
class Eagle3Config:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    # SGLang's eagle_aux_hidden_state_layer_ids: id k is the OUTPUT of target layer k (HF hidden_states[k+1])
    aux_layer_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not self.aux_layer_ids:
            raise ValueError("no aux layer ids: name the target layers the head fuses (eagle_config."
                             "eagle_aux_hidden_state_layer_ids), or load with target_config for SGLang's default")
        if len(self.aux_layer_ids) * self.target_hidden_size == self.hidden_size:
            # SGLang applies fc only when the feature width differs from the embedding width
            raise ValueError(f"{len(self.aux_layer_ids)} aux layers x target_hidden_size {self.target_hidden_size} "
                             f"equals hidden_size: SGLang would skip fc; fuse a different number of layers")

    @classmethod
    def for_target(cls, target_config, draft_vocab_size: int, intermediate_size: int | None = None,
                   aux_layer_ids: list[int] | None = None) -> "Eagle3Config":
        """A head shaped for `target_config` (a transformers config): same width, heads and rope as the
        target; default aux ids [1, L//2-1, L-4] are SGLang's default capture points [2, L//2, L-3]."""
        t = _text(target_config)
        n_layers = t.num_hidden_layers
        ids = list(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(n_layers)
        _check_layer_ids(ids, n_layers)
        heads = t.num_attention_heads
        return cls(
            hidden_size=t.hidden_size, num_attention_heads=heads,
            num_key_value_heads=getattr(t, "num_key_value_heads", None) or heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
            intermediate_size=intermediate_size or t.intermediate_size, rms_norm_eps=t.rms_norm_eps,
            rope_theta=_rope_theta(t), max_position_embeddings=t.max_position_embeddings,
            vocab_size=t.vocab_size, draft_vocab_size=draft_vocab_size, target_hidden_size=t.hidden_size,
            aux_layer_ids=ids)

    def to_sglang(self) -> dict:
        """config.json as SGLang's loader reads it; every option that loaders default differently is explicit."""
        return {
            "architectures": [ARCHITECTURE], "model_type": "llama",
            "hidden_size": self.hidden_size, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": 1,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings, "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size, "target_hidden_size": self.target_hidden_size,
            "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids), "norm_before_fc": False},
            "fc_norm": False, "norm_output": False, "torch_dtype": str(SAVE_DTYPE).removeprefix("torch."),
        }

    @classmethod
    def from_sglang(cls, cfg: dict, default_aux_ids: list[int] | None = None) -> "Eagle3Config":
        """Parse a checkpoint's config.json, refusing options this head does not implement.
        `default_aux_ids` stands in for absent layer ids (SGLang then uses its default capture)."""
        if ARCHITECTURE not in cfg.get("architectures", []):
            raise ValueError(f"architectures {cfg.get('architectures')} is not [{ARCHITECTURE!r}]: not an EAGLE-3 head")
        eagle = cfg.get("eagle_config") or {}
        unsupported = {
            "norm_before_fc": eagle.get("norm_before_fc", cfg.get("norm_before_fc", False)),
            "fc_norm": cfg.get("fc_norm") or cfg.get("use_aux_norm", False),
            "norm_output": cfg.get("norm_output", False),
            "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
            "attention_bias": cfg.get("attention_bias", False) or cfg.get("bias", False),
            "mlp_bias": cfg.get("mlp_bias", False),
        }
        on = [k for k, v in unsupported.items() if v]
        if on:
            raise ValueError(f"unsupported EAGLE-3 options set in config.json: {on}; this head implements the "
                             f"SGLang default (all false): retrain or export with them false")
        if cfg.get("num_hidden_layers", 1) != 1 or cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"num_hidden_layers {cfg.get('num_hidden_layers')} / hidden_act {cfg.get('hidden_act')}: "
                             f"only one decoder layer with silu is supported")
        if not cfg.get("draft_vocab_size"):
            raise ValueError("config.json has no draft_vocab_size: the head needs its own lm_head and d2t")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is unsupported: default rope only")
        heads = cfg["num_attention_heads"]
        return cls(
            hidden_size=cfg["hidden_size"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"], rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"],
            draft_vocab_size=cfg["draft_vocab_size"],
            target_hidden_size=cfg.get("target_hidden_size", cfg["hidden_size"]),
            aux_layer_ids=list(eagle.get("eagle_aux_hidden_state_layer_ids") or default_aux_ids or []))

    def check_target(self, target_config) -> None:
        """Raise a ValueError naming the mismatch between this head and a target config, and the fix."""
        t = _text(target_config)
        fix = "train a head for this target (python -m sglang_cascade.training.train_eagle3) or pass the matching target"
        if t.hidden_size != self.hidden_size:
            raise ValueError(f"head hidden_size {self.hidden_size} != target hidden_size {t.hidden_size} "
                             f"(the head consumes the target's token embeddings): {fix}")
        if t.hidden_size != self.target_hidden_size:
            raise ValueError(f"head target_hidden_size {self.target_hidden_size} != target hidden_size "
                             f"{t.hidden_size}: {fix}")
        if t.vocab_size != self.vocab_size:
            raise ValueError(f"head vocab_size {self.vocab_size} != target vocab_size {t.vocab_size} "
                             f"(d2t/t2d map into the target's vocabulary): {fix}")
        _check_layer_ids(self.aux_layer_ids, t.num_hidden_layers)


def default_aux_layer_ids(n_layers: int) -> list[int]:
    """SGLang's default capture points [2, L//2, L-3] (layer inputs) as aux ids (layer outputs)."""
    return [1, n_layers // 2 - 1, n_layers - 4]


def _text(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _check_layer_ids(ids: list[int], n_layers: int) -> None:
    """SGLang captures aux id k at the input of target layer k+1, so k must lie in [0, L-2], each once."""
    bad = [k for k in ids if not 0 <= k <= n_layers - 2]
    if bad:
        raise ValueError(f"aux layer ids {bad} do not exist in a {n_layers}-layer target (valid: 0..{n_layers - 2}, "
                         f"id k = output of layer k, captured at the input of layer k+1): pass aux_layer_ids "
                         f"within range or use a head trained for this target")
    if len(set(ids)) != len(ids):
        raise ValueError(f"aux layer ids {ids} repeat a layer: SGLang captures each layer once, so its fc input "
                         f"would be narrower than the head's; pass distinct aux_layer_ids")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as SGLang's forward_native does."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Eagle3DraftHead(nn.Module):
    """fc fusion + one Llama decoder layer over concat[norm(embeds), norm(features)] + norm + lm_head."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(len(c.aux_layer_ids) * c.target_hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList([_Layer(c)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        # identity map until a draft vocabulary is set (set_vocab)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.arange(c.vocab_size) < c.draft_vocab_size)

    def set_vocab(self, draft_to_target: torch.Tensor) -> None:
        """Install the draft vocabulary: draft id i is target id draft_to_target[i] (ascending, unique)."""
        ids = draft_to_target.to(torch.int64)
        if ids.shape != self.d2t.shape or not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError(f"draft vocabulary must be {self.d2t.shape[0]} ascending unique target ids")
        self.d2t.copy_(ids - torch.arange(ids.shape[0]))
        self.t2d.zero_()
        self.t2d[ids] = True

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[..., num_aux * target_hidden] (aux layers concatenated low, mid, high) -> [..., hidden]."""
        return self.fc(aux_hidden)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Llama (neox-style) rotary embedding, in float32 whatever the head's dtype."""
        c = self.config
        exponents = torch.arange(0, c.head_dim, 2, device=x.device, dtype=torch.float32) / c.head_dim
        inv_freq = 1.0 / c.rope_theta ** exponents  # SGLang's formula, to the last bit
        freqs = positions.to(torch.float32)[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]  # broadcast over heads
        return (x.float() * emb.cos() + _rotate_half(x.float()) * emb.sin()).to(x.dtype)

    def forward_hidden(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                       attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One draft step. embeds [T,H] (target embeddings of the tokens), features [T,H] (fused target
        features, or the previous step's output), positions [T]. Leading batch dims are allowed.

        attend(q [T,n_heads,d], k [T,n_kv,d], v [T,n_kv,d]) -> [T, n_heads*d] is the caller's (it owns
        the KV cache and the mask). Returns the pre-norm output, the feature stream of the next step."""
        c, layer = self.config, self.layers[0]
        attn = layer.self_attn
        lead = embeds.shape[:-1]
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(features)], dim=-1)
        q = self._rope(attn.q_proj(x).view(*lead, c.num_attention_heads, c.head_dim), positions)
        k = self._rope(attn.k_proj(x).view(*lead, c.num_key_value_heads, c.head_dim), positions)
        v = attn.v_proj(x).view(*lead, c.num_key_value_heads, c.head_dim)
        residual = attn.o_proj(attend(q, k, v)) + features
        return layer.mlp(layer.post_attention_layernorm(residual)) + residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., draft_vocab]."""
        return self.lm_head(self.norm(hidden))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors in SGLang's layout, weights in bfloat16 (small checkpoints)."""
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.to(SAVE_DTYPE) if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(path / WEIGHTS), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(self.config.to_sglang(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, target_config=None) -> "Eagle3DraftHead":
        """Load a head (ours or any SGLang-layout EAGLE-3 export) in float32; with `target_config`, check
        that it fits that target. SGLang's legacy `midlayer.` prefix is accepted; embed_tokens is ignored
        (the target's embeddings are used)."""
        path = pathlib.Path(path)
        default_ids = None
        if target_config is not None:  # SGLang's default capture when the checkpoint names no layers
            default_ids = default_aux_layer_ids(_text(target_config).num_hidden_layers)
        config = Eagle3Config.from_sglang(json.loads((path / "config.json").read_text()), default_ids)
        if target_config is not None:
            config.check_target(target_config)
        head = cls(config)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        tensors = {}
        for f in files:
            tensors.update({k.replace("midlayer.", "layers.0."): v for k, v in load_file(str(f)).items()})
        expected = head.state_dict()
        missing = [k for k in expected if k not in tensors and k != "t2d"]
        if missing:
            raise ValueError(f"{path} is missing tensors {missing}")
        if "t2d" not in tensors:  # optional in SGLang (it skips t2d); rebuild it from d2t
            ids = torch.arange(config.draft_vocab_size) + tensors["d2t"].to(torch.int64)
            tensors["t2d"] = torch.zeros(config.vocab_size, dtype=torch.bool).index_fill_(0, ids, True)
        for k, ref in expected.items():
            if tensors[k].shape != ref.shape:
                raise ValueError(f"tensor {k} has shape {tuple(tensors[k].shape)}, "
                                 f"config.json implies {tuple(ref.shape)}")
        head.load_state_dict({k: tensors[k].to(ref.dtype) for k, ref in expected.items()})
        return head


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over one sequence, q [..., T, n_heads, d], k/v [..., T, n_kv, d] -> [..., T, n_heads*d]."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         is_causal=True, enable_gqa=q.shape[-2] != k.shape[-2])
    return out.transpose(-3, -2).flatten(-2)
