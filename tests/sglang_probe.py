"""Whether SGLang's CPU server can run here, probed in a subprocess (a CPU kernel build for another
instruction set dies with SIGILL, which must become a skip, not a crashed test run)."""

import functools
import signal
import subprocess
import sys

ENABLE = "install SGLang 0.5.23's CPU kit into the venv: bash ../shared/sglang-cpu/install.sh .venv"


@functools.lru_cache(maxsize=None)
def sglang_missing(modules: str = "sglang,sgl_kernel") -> str | None:
    """None if `import <modules>` works in a fresh interpreter, else the reason to skip."""
    code = "; ".join(f"import {m}" for m in modules.split(","))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if res.returncode == 0:
        return None
    if res.returncode == -signal.SIGILL:
        return f"{modules} died with an illegal instruction (CPU kernels built for another CPU); {ENABLE}"
    last = (res.stderr.strip().splitlines() or ["?"])[-1]
    return f"cannot import {modules} ({last}); {ENABLE}"
