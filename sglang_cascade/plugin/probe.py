"""Whether SGLang's CPU server can run here, probed in a subprocess: a CPU kernel build for another
instruction set dies with SIGILL, which must become a reason (a skip, a clear exit), not a crash."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys

ENABLE = "install SGLang 0.5.23's CPU kit into the venv: bash scripts/setup.sh"


@functools.lru_cache(maxsize=None)
def sglang_missing(modules: str = "sglang,sgl_kernel") -> str | None:
    """None if `import <modules>` works in a fresh interpreter, else why not."""
    code = "; ".join(f"import {m}" for m in modules.split(","))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"})
    if res.returncode == 0:
        return None
    if res.returncode == -signal.SIGILL:
        return f"{modules} died with an illegal instruction (CPU kernels built for another CPU); {ENABLE}"
    last = (res.stderr.strip().splitlines() or ["?"])[-1]
    return f"cannot import {modules} ({last}); {ENABLE}"
