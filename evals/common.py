"""What every benchmark records beside its numbers: the machine, the commit and the date."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

RESULTS = pathlib.Path(__file__).parent / "results"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    torch = sys.modules.get("torch")  # only when the caller already uses it
    gpu = torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}"


def cpu_kernels() -> str:
    """The CPU kernels a run used: ATen's dispatch level and SGLang's CPU kernel build, if installed (the
    kit's AVX-512 build or this project's AVX2 build round bf16 results differently)."""
    import importlib.metadata

    torch = sys.modules.get("torch")
    aten = torch.backends.cpu.get_cpu_capability() if torch is not None else "torch not loaded"
    try:
        version = importlib.metadata.version("sglang-kernel-cpu")
        sgl = f"sglang-kernel-cpu {version} ({'AVX2 build' if 'avx2' in version else 'AVX-512 build'})"
    except importlib.metadata.PackageNotFoundError:
        sgl = "no SGLang CPU kernels"
    return f"ATen {aten}; {sgl}"


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=pathlib.Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"machine": machine(), "cpu_kernels": cpu_kernels(), "commit": commit or "unknown",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write(name: str, payload: dict, table: str, results_dir: pathlib.Path = RESULTS) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (results_dir / f"{name}.md").write_text(table)
