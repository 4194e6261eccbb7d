"""`sglang-cascade generate` prints text and a speculative report; bad flag values fail fast and clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "sglang_cascade.cli"]


@pytest.mark.slow
def test_generate_prints_text_and_report():
    r = subprocess.run(CLI + ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("iterations", "tokens / iteration", "acceptance length", "iterations speculating",
                "config history", "tokens/s"):
        assert row in r.stdout, r.stdout
    text = r.stdout.split("\n\niterations")[0]
    assert text.strip(), r.stdout
    assert "loaded in" in r.stderr  # progress goes to stderr, not into the text


@pytest.mark.parametrize("command, flags, needle", [
    ("generate", ["--prompt", "hi", "--mode", "static", "--static-config", "banana"], "banana"),
    ("generate", ["--prompt", "hi", "--mode", "sometimes"], "sometimes"),
    ("serve", ["--port", "not-a-port"], "not-a-port"),
])
def test_bad_flag_value_exits_nonzero_with_a_message(command, flags, needle):
    r = subprocess.run(CLI + [command] + flags, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
