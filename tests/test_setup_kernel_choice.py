"""Set-up picks the build of SGLang's CPU kernels that a CPU can run, from its /proc/cpuinfo flags.

`scripts/install_sglang_cpu.sh --pick-kernel FLAGS` prints avx512, avx2 or none and installs
nothing, so the choice for CPUs other than this one is checked here with their flag lists.
"""

from __future__ import annotations

import pathlib
import subprocess
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install_sglang_cpu.sh"

X86_64_V3 = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx f16c fma movbe abm bmi1 bmi2 avx2"
AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl"
CPUS = {
    # Sapphire Rapids: AVX-512 with BF16/VNNI and AMX (SGLang's AMX paths run there).
    "sapphire_rapids": (f"{X86_64_V3} {AVX512} avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8", "avx512"),
    # AMD Zen 4 / Zen 5 EPYC: AVX-512 with BF16/VNNI, no AMX.
    "zen4": (f"{X86_64_V3} {AVX512} avx512ifma avx512vbmi avx512_vnni avx512_bf16 avx512_bitalg", "avx512"),
    # Ice Lake: AVX-512 and VNNI but no BF16, which the AVX-512 build is compiled with.
    "ice_lake": (f"{X86_64_V3} {AVX512} avx512ifma avx512vbmi avx512_vnni", "avx2"),
    # Skylake-SP: AVX-512 F/BW/CD/DQ/VL only.
    "skylake_sp": (f"{X86_64_V3} {AVX512}", "avx2"),
    # Haswell / Zen 2 / Zen 3: x86-64-v3.
    "haswell": (X86_64_V3, "avx2"),
    # AVX-512 flags without the x86-64-v3 base cannot happen, but must not pick avx512.
    "avx512_without_bmi2": (f"{X86_64_V3.replace(' bmi2', '')} {AVX512} avx512_vnni avx512_bf16", "none"),
    # Sandy Bridge: AVX without AVX2.
    "sandy_bridge": ("fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx", "none"),
    "no_flags": ("", "none"),
}


def pick(flags: str | None) -> str:
    args = ["bash", str(SCRIPT), "--pick-kernel"] + ([flags] if flags is not None else [])
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_pick_by_flags(cpu):
    flags, expected = CPUS[cpu]
    assert pick(flags) == expected


def test_flag_names_match_whole_words():
    # "avx2" must not be found inside "avx512..." names, nor "avx512f" inside "avx512fp16".
    flags = f"{X86_64_V3.replace(' avx2', '')} avx512fp16 avx512bw avx512cd avx512dq avx512vl avx512_bf16 avx512_vnni"
    assert pick(flags) == "none"


def test_this_machine_gets_a_choice():
    flags = ""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((ln.split(":", 1)[1] for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
    assert pick(None) == pick(flags)


@pytest.mark.parametrize("variant", ["avx512", "avx2"])
def test_each_choice_has_its_wheel(variant):
    wheels = sorted((ROOT / "third_party" / f"sgl-kernel-cpu-{variant}").glob("sglang_kernel_cpu-*.whl"))
    assert len(wheels) == 1, wheels
    name = wheels[0].name
    assert f"+{variant}-cp311-cp311-linux_x86_64.whl" in name
    with zipfile.ZipFile(wheels[0]) as whl:
        assert any(n.startswith("sgl_kernel/common_ops.") and n.endswith(".so") for n in whl.namelist())


def test_setup_needs_nothing_beside_the_repository():
    for script in ("setup.sh", "install_sglang_cpu.sh"):
        assert "../shared" not in (ROOT / "scripts" / script).read_text()
