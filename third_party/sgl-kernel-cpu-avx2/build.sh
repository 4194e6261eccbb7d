#!/usr/bin/env bash
# Rebuild sglang_kernel_cpu-0.4.5+avx2 (SGLang's CPU kernel library for x86-64-v3, no AVX-512/AMX).
#
#   MIRROR=/path/to/sglang.git bash third_party/sgl-kernel-cpu-avx2/build.sh
#
# MIRROR: a git directory of SGLang's source holding REV (GitHub sgl-project/sglang, or the mirror
# mingfeima/sglang this wheel was built from). KIT: ../shared/sglang-cpu, whose compatibility patch
# is applied first. PY: a Python with torch==2.13.0 (CPU), scikit-build-core and wheel; the wheel is
# ABI-tied to that torch. Needs libnuma-dev, cmake and g++. About 12 minutes on one core.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${MIRROR:?set MIRROR to a git directory of SGLang's source}"
REV=${REV:-2f14d6c6f23fc06d59249ce4663b94f8a92ad02e}
KIT=${KIT:-$here/../../../shared/sglang-cpu}
PY=${PY:-python3}
OUT=${OUT:-$here}
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT

git -C "$MIRROR" archive "$REV" sgl-kernel | tar -x -C "$src"
cd "$src/sgl-kernel"
for p in "$KIT"/patches/*.patch "$here"/*.patch; do
  echo "applying $p"
  patch -p1 < "$p"
done
cp pyproject_cpu.toml pyproject.toml   # scikit-build-core CPU project (cmake source dir csrc/cpu)
MAX_JOBS=${MAX_JOBS:-1} CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-1} \
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$OUT" .
