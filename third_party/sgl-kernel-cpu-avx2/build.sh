#!/usr/bin/env bash
# Rebuild sglang_kernel_cpu-0.4.5+avx2 (SGLang's CPU kernel library for x86-64-v3, no AVX-512/AMX).
#
#   MIRROR=/path/to/sglang.git PY=/path/to/venv/bin/python bash third_party/sgl-kernel-cpu-avx2/build.sh
#
# The same source, torch and steps as the AVX-512 build (../sgl-kernel-cpu-avx512/build.sh, whose header
# says what MIRROR, PY, REV and OUT are and what the build needs): its compatibility patch, then
# sgl-kernel-cpu-avx2.patch (this folder) in place of its AMX interface patch, which an AVX2 CPU never
# needs. About 12 minutes on one core.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCHES="$here/sgl-kernel-cpu-avx2.patch" VARIANT=avx2 OUT="${OUT:-$here}" \
  exec bash "$here/../sgl-kernel-cpu-avx512/build.sh"
