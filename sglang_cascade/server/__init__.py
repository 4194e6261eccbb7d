"""SGLang-compatible HTTP server for the portable engine: `python -m sglang_cascade.server`."""
