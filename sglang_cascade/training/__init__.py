"""Draft-head training pipeline (data, target features, EAGLE-3 unroll training, acceptance report)."""

import os

# On shared few-core machines, OpenMP threads that spin while waiting made training steps 2-6x slower
# and erratic; passive waiting must be chosen before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
