"""EAGLE draft heads in SGLang's checkpoint layout (see drafters.eagle3); trained heads live in checkpoints/."""
