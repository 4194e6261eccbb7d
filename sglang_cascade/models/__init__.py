"""Target models: the embedded default MoE (SmolLM2-135M-Instruct MoEfied into a Mixtral).

Importing this package is cheap; torch and transformers load only when a build runs."""

from .default_model import default_moe_dir, ensure_default_moe, smollm2_gguf_path

__all__ = ["default_moe_dir", "ensure_default_moe", "smollm2_gguf_path"]
