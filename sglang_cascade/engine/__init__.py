"""Portable speculative engine on PyTorch + transformers model classes (CPU, or one GPU)."""

from sglang_cascade.engine.acceptance import SamplingParams
from sglang_cascade.engine.config import EngineConfig, GenerationRequest, StepOutput
from sglang_cascade.engine.engine import Engine

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "SamplingParams", "StepOutput"]
