#!/usr/bin/env bash
# Rebuild sglang_kernel_cpu-0.4.5+avx512: SGLang's CPU kernel library as SGLang itself builds it for
# x86-64 (-march=x86-64-v4 with AVX-512 BF16/VNNI, and the AMX code paths compiled in; SGLang picks
# the AMX paths at run time only on CPUs that have AMX).
#
#   MIRROR=/path/to/sglang.git PY=/path/to/venv/bin/python bash third_party/sgl-kernel-cpu-avx512/build.sh
#
# MIRROR: a git directory of SGLang's source (Apache-2.0) holding REV: GitHub's sgl-project/sglang,
# or its mirror mingfeima/sglang, whose main was REV when this wheel was built. PY: a Python 3.11 with
# torch==2.13.0 (the CPU build), scikit-build-core, wheel and cmake; the wheel is tied to that torch's
# C++ ABI, so it must be the torch the server's venv runs. Needs libnuma-dev and g++ (12 or newer, for
# the AMX flags). The build compiles only; it runs nothing, so any x86-64 machine can build it.
# About 20 minutes on one core (MAX_JOBS=1). The wheel lands in OUT (default: this folder).
#
# Patches applied, in order: sgl-kernel-cpu-compat.patch (this folder: the attention and verify ops as
# SGLang 0.5.23 calls them, for every build), then PATCHES, by default sgl-kernel-cpu-amx-interface.patch
# (this folder: the ops that SGLang 0.5.23 calls only on AMX CPUs); the AVX2 build passes its own patch
# there instead. The version gets a local tag (VARIANT, default avx512; the AVX2 patch sets +avx2 itself)
# so that the builds are told apart in `pip list`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${MIRROR:?set MIRROR to a git directory of the SGLang source}"
REV=${REV:-2f14d6c6f23fc06d59249ce4663b94f8a92ad02e}
PY=${PY:-python3}
OUT=${OUT:-$here}
VARIANT=${VARIANT:-avx512}
PATCHES=${PATCHES-$here/sgl-kernel-cpu-amx-interface.patch}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT

# At REV the CPU kernels live in sgl-kernel/ (later SGLang moved them to python/sglang/kernels/aot).
git -C "$MIRROR" archive "$REV" sgl-kernel | tar -x -C "$src"
cd "$src/sgl-kernel"
for p in "$here/sgl-kernel-cpu-compat.patch" $PATCHES; do
  echo "applying $p"
  patch -p1 < "$p"
done
# Local version tag: 0.4.5 -> 0.4.5+avx512 (leaves a version that already has one alone).
sed -i -E "s/^version = \"([0-9.]+(\.post[0-9]+)?)\"$/version = \"\1+$VARIANT\"/" pyproject_cpu.toml
grep -m1 '^version' pyproject_cpu.toml
cp pyproject_cpu.toml pyproject.toml   # scikit-build-core's CPU project (cmake source dir csrc/cpu)
MAX_JOBS=${MAX_JOBS:-1} CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-1} \
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$OUT" .
