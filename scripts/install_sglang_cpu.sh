#!/usr/bin/env bash
# Install SGLang 0.5.23's real server, CPU backend, into a virtualenv (scripts/setup.sh calls it).
#
#   bash scripts/install_sglang_cpu.sh [VENV]          default VENV: .venv (created with python3.11)
#   bash scripts/install_sglang_cpu.sh --pick-kernel [FLAGS]
#       prints which CPU kernel build suits a CPU with these /proc/cpuinfo flags (default: this
#       machine's): avx512, avx2 or none. Installs nothing.
#
# Why each step (SGLang publishes no CPU-ready install; its wheel's requirements pull CUDA):
#   1. torch 2.13.0, the CPU build: the kernel wheels in third_party/ are compiled against its C++ ABI
#      and load into no other torch. A looser pin would let pip fetch a multi-GB CUDA build.
#   2. sglang 0.5.23 without its dependencies: they name torch==2.14.1 and CUDA-only kernel packages.
#      Then scripts/requirements-sglang-cpu.txt (its runtime requirements less the CUDA-only ones),
#      with torch==2.13.0 as a constraint so that nothing moves torch.
#   3. SGLang's CPU kernel library (`sgl_kernel`: attention, KV-cache moves, EAGLE tree build and greedy
#      verify as `*_cpu` ops). PyPI has only CUDA builds of it, so third_party/ holds two CPU builds made
#      from SGLang's source by the project's own scripts: sgl-kernel-cpu-avx512 (SGLang's own x86-64
#      flags: AVX-512 with BF16 and VNNI, AMX code compiled in and taken only on CPUs with AMX) and
#      sgl-kernel-cpu-avx2 (x86-64-v3, for CPUs without those). The CPU's flags pick one; if the
#      picked build does not load (its import dies on an instruction the CPU lacks), the AVX2 build
#      replaces it.
#   4. A guard in torchvision: the only torchvision wheel that matches torch 2.13.0 here is a CUDA
#      build, whose fake-op registration for nms fails against CPU torch; SGLang imports torchvision at
#      start-up. The guard registers those two fake ops only where torchvision's own ops loaded.
#   5. An import check of torch, sglang, sgl_kernel and torchvision with one CPU op looked up.
# Idempotent: re-running it on an installed VENV re-installs only the kernel wheel and re-checks.
# Exit status 0 only when the final check passes.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The kernel build that suits a CPU, from its /proc/cpuinfo flags (space-separated).
# avx512: what the AVX-512 build is compiled for (-march=x86-64-v4 -mavx512bf16 -mavx512vnni): the
#         x86-64-v4 set (AVX-512 F/BW/CD/DQ/VL) plus AVX-512 BF16 and VNNI. AMX is not required: the
#         AMX code runs only where SGLang finds amx_tile/amx_bf16 (Sapphire Rapids and later).
# avx2:   x86-64-v3 (AVX2, FMA, BMI1/2, F16C, MOVBE, LZCNT: "abm" in /proc/cpuinfo).
# none:   anything else (no CPU build of SGLang's kernels runs there).
pick_kernel() {
  local flags=" $* " f
  local -a avx512=(avx512f avx512bw avx512cd avx512dq avx512vl avx512_bf16 avx512_vnni)
  local -a avx2=(avx avx2 fma bmi1 bmi2 f16c movbe abm)
  local ok=1
  for f in "${avx512[@]}" "${avx2[@]}"; do [[ $flags == *" $f "* ]] || ok=0; done
  if ((ok)); then echo avx512; return; fi
  ok=1
  for f in "${avx2[@]}"; do [[ $flags == *" $f "* ]] || ok=0; done
  if ((ok)); then echo avx2; else echo none; fi
}

cpu_flags() { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || true; }

if [ "${1:-}" = "--pick-kernel" ]; then
  shift
  if [ $# -gt 0 ]; then pick_kernel "$*"; else pick_kernel "$(cpu_flags)"; fi
  exit 0
fi

venv=${1:-$root/.venv}
say() { echo "install_sglang_cpu: $*" >&2; }

# CASCADE_CPU_KERNEL=avx2 (or avx512) overrides the choice, e.g. to try the AVX2 build on an AVX-512 CPU.
variant=${CASCADE_CPU_KERNEL:-$(pick_kernel "$(cpu_flags)")}
case $variant in avx512|avx2|none) ;; *) say "CASCADE_CPU_KERNEL must be avx512 or avx2"; exit 1;; esac
if [ "$(uname -m)" != x86_64 ] || [ "$variant" = none ]; then
  say "this CPU has neither AVX-512 (with BF16/VNNI) nor AVX2: no CPU build of SGLang's kernels runs here"
  exit 1
fi

# The kernel wheels are built for CPython 3.11.
if [ ! -x "$venv/bin/python" ]; then
  command -v python3.11 >/dev/null || { say "python3.11 is needed (the kernel wheels are cp311)"; exit 1; }
  python3.11 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { say "$venv runs Python $("$py" -V 2>&1); the kernel wheels need 3.11"; exit 1; }
pin=$(mktemp); trap 'rm -f "$pin"' EXIT
echo "torch==2.13.0" > "$pin"

"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0                                           # step 1
"$py" -m pip install -q --no-deps sglang==0.5.23                                 # step 2
say "pip may print an ERROR that sglang 0.5.23 requires torch==2.14.1 and CUDA kernel packages:" \
    "harmless here: SGLang's CPU kernels are built against torch 2.13.0, and its CPU backend needs none of those"
"$py" -m pip install -q -c "$pin" -r "$root/scripts/requirements-sglang-cpu.txt"

install_kernel() {                                                               # step 3
  local whl
  whl=$(ls "$root/third_party/sgl-kernel-cpu-$1"/sglang_kernel_cpu-*.whl)
  say "SGLang's CPU kernels built for $1 ($(basename "$whl"))"
  "$py" -m pip install -q --no-deps --force-reinstall "$whl"
}
install_kernel "$variant"

"$py" - <<'EOF'                                                                  # step 4
import importlib.util, os, re
path = os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin), "_meta_registrations.py")
src = open(path).read()
guarded = re.sub(r'^@torch\.library\.register_fake\("(torchvision::q?nms)"\)$',
                 r'@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda f: f))',
                 src, flags=re.M)
if guarded != src:
    open(path, "w").write(guarded)
EOF

check() {                                                                        # step 5
  SGLANG_USE_CPU_ENGINE=1 "$py" -c "
import torch, sglang, sgl_kernel, torchvision
assert hasattr(torch.ops.sgl_kernel, 'verify_tree_greedy_cpu'), 'CPU kernels missing'
print('sglang', sglang.__version__, '| torch', torch.__version__, '| CPU sgl_kernel ops loaded')
"
}
if check; then exit 0; fi
if [ "$variant" = avx512 ]; then
  say "the AVX-512 build does not load on this CPU; trying the AVX2 build"
  install_kernel avx2
  check && exit 0
fi
say "SGLang's CPU kernels do not load on this CPU"
exit 1
