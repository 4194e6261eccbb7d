"""One-line messages to stderr: SGLang's logging is not configured yet when plugins load."""

import multiprocessing
import os
import sys


def announce(message: str) -> None:
    proc = multiprocessing.current_process().name
    print(f"[sglang-cascade pid {os.getpid()} {proc}] {message}", file=sys.stderr, flush=True)
