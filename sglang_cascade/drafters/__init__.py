"""EAGLE draft heads in SGLang's checkpoint layout (see sglang_cascade.drafters.eagle3); trained heads live in checkpoints/."""
