"""The servers the evals compare modes on: the portable engine's and SGLang's real one.

Each target turns a mode into a launch command; the runner starts it, speaks SGLang's /generate to
it and stops it. Both serve the embedded default MoE with the default EAGLE-3 head.
"""

from __future__ import annotations

import sys

from sglang_cascade.engine.engine import DEFAULT_HEAD_DIR, default_target_path

K0_MODE = "cascade k0"
SGLANG_CPU = ["--device", "cpu", "--dtype", "bfloat16", "--max-total-tokens", "8192",
              "--prefill-attention-backend", "intel_amx", "--decode-attention-backend", "intel_amx"]


class EngineTarget:
    name = "engine"
    side_by_side = True  # an idle server sleeps on its socket
    description = "portable engine server (python -m sglang_cascade.server)"
    env: dict = {}

    def __init__(self, threads: int = 1, max_running: int = 8):
        self.threads, self.max_running = threads, max_running
        # what the server loads without --model-path / --draft-model-path (the report records their digests)
        self.model, self.draft = str(default_target_path()), str(DEFAULT_HEAD_DIR)

    def modes(self, static: list[str]) -> list[tuple[str, list[str]]]:
        return ([("plain", ["--mode", "plain"])]
                + [(f"static {s}", ["--mode", "static", "--static-config", s]) for s in static]
                + [("sglang-adaptive", ["--mode", "adaptive"]), ("cascade", ["--mode", "cascade"])])

    def command(self, flags: list[str], port: int, iteration_log: str) -> list[str]:
        return [sys.executable, "-m", "sglang_cascade.server", "--port", str(port), "--threads", str(self.threads),
                "--max-running-requests", str(self.max_running), "--iteration-log", iteration_log, *flags]



class SGLangTarget:
    """SGLang 0.5.23's server on CPU (../shared/sglang-cpu): no speculation, static EAGLE3, its own
    --speculative-adaptive, and Cascade through this project's plugin (which also gives SGLang's
    Mixtral class the EAGLE3 hidden-state capture the default MoE needs)."""

    name = "sglang"
    side_by_side = False  # SGLang's CPU scheduler busy-polls when idle
    description = "SGLang 0.5.23 server (python -m sglang.launch_server, CPU backend)"
    # one OpenMP thread: servers side by side on a small machine otherwise spin-wait on each other
    env = {"SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1"}

    def __init__(self, max_running: int = 8):
        self.max_running = max_running
        self.model, self.draft = str(default_target_path()), str(DEFAULT_HEAD_DIR)

    def modes(self, static: list[str]) -> list[tuple[str, list[str]]]:
        eagle = ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", self.draft]
        out = [("plain", [])]
        for s in static:
            steps, topk, tokens = s.split("x")
            out.append((f"static {s}", eagle + ["--speculative-num-steps", steps, "--speculative-eagle-topk", topk,
                                                "--speculative-num-draft-tokens", tokens]))
        chain = eagle + ["--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                         "--speculative-num-draft-tokens", "4", "--cuda-graph-backend-decode", "disabled"]
        out.append(("sglang-adaptive", chain + ["--speculative-adaptive"]))
        # Cascade held at plain decoding (a ladder of plain alone): what its steps-0 tier costs against
        # no speculation (the "K=0 tax": SGLang still runs the draft model's extend after each step)
        out.append((K0_MODE, chain + ["--cascade", "--cascade-candidates", "0"]))
        out.append(("cascade", chain + ["--cascade"]))
        return out

    def command(self, flags: list[str], port: int, iteration_log: str) -> list[str]:
        log = ["--cascade-iteration-log", iteration_log] if "--cascade" in flags else []
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model, "--host", "127.0.0.1",
                "--port", str(port), "--max-running-requests", str(self.max_running), *SGLANG_CPU, *flags, *log]
