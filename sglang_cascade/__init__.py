"""sglang-cascade: utility-driven speculative decoding for Mixture-of-Experts models."""

__version__ = "0.1.0"
