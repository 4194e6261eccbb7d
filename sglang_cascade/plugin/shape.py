"""The cost model's view (MoEShape) of an SGLang target, read from its Hugging Face config.

Covers the config spellings of Mixtral (num_local_experts, intermediate_size), Qwen2/3-MoE
(num_experts, moe_intermediate_size, shared_expert_intermediate_size) and DeepSeek
(n_routed_experts, n_shared_experts); a dense model counts as one expert always taken.
"""

from __future__ import annotations

from sglang_cascade.controller import MoEShape


def target_shape(config, draft_params: int, bytes_per_param: float = 2) -> MoEShape:
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    experts = (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
               or getattr(config, "n_routed_experts", None) or 1)
    top_k = (getattr(config, "num_experts_per_tok", None) or 1) if experts > 1 else 1
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = (getattr(config, "shared_expert_intermediate_size", None) or 0) + \
        (getattr(config, "n_shared_experts", None) or 0) * inter
    attn = h * head_dim * (2 * heads + 2 * kv_heads)
    dense = layers * (attn + experts * h + 2 * h + 3 * h * shared) + 2 * config.vocab_size * h + h
    return MoEShape(num_layers=layers, hidden_size=heads * head_dim, num_experts=experts, top_k=min(top_k, experts),
                    expert_params=3 * h * inter, dense_params=dense,
                    kv_bytes_per_token=int(2 * layers * kv_heads * head_dim * bytes_per_param),
                    bytes_per_param=bytes_per_param, draft_params=draft_params)
