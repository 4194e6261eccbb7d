"""The portable engine's HTTP server (`python -m sglang_cascade.server`) on 127.0.0.1 for tests, and a
character tokenizer for its model-free ones."""

import contextlib
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import requests

STARTUP_TIMEOUT_S = 900  # the first run builds the default MoE


class CharTokenizer:
    """One token per character: enough to test parsing, detokenisation and stop strings."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))

    def __len__(self):
        return 0x110000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def engine_server(log, *flags):
    """A server with `flags`, up and healthy; SimpleNamespace(url, proc, log); killed on exit."""
    port = free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sglang_cascade.server", "--host", "127.0.0.1", "--port",
                                 str(port), *flags], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before it was ready:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield SimpleNamespace(url=url, proc=proc, log=log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
