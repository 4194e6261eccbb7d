"""SGLang's real server (`python -m sglang.launch_server`) on 127.0.0.1 for the plugin's tests.

Servers run one OpenMP thread (on a shared 2-core machine more threads spin-wait on each other and
decoding slows ~15x) and sleep when idle, so a server waiting beside the one at work costs no core.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from evals import greedy_standard


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(model_path, port, *extra):
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-total-tokens", "8192",
            "--prefill-attention-backend", "intel_amx", "--decode-attention-backend", "intel_amx",
            "--skip-server-warmup", "--sleep-on-idle", *extra]


def server_env():
    return {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1"}


class Server:
    def __init__(self, model_path, *extra, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang-plugin-test-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(launch_cmd(model_path, self.port, *extra), env={**server_env(), **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    pytest.fail(f"server not healthy after 600 s:\n{self.tail()}")
                time.sleep(2)

    def tail(self, n=4000):
        self.log.flush()
        text = pathlib.Path(self.log.name).read_text(errors="replace")
        return "\n".join(line[:400] for line in text[-n:].splitlines())

    def post(self, path, body, timeout=600):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)

    def generate(self, ids, new_tokens, **extra):
        """Greedy output(s) for one prompt's token ids, or a list of prompts in one batched request."""
        return self.post("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": new_tokens,
                                                                             "temperature": 0}, **extra})

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def output_ids(outputs):
    return [o["output_ids"] for o in outputs]


class Reference:
    """The no-speculation server's own outputs, each prompt alone, all in one batch and in batches of
    each size in `groups` (a decode row alone rounds bf16 differently from one in a batch; on the kit's
    AVX-512 kernels batches of 2 to 5 decoded exactly as all 20 together, other kernels may block
    them differently); with its server kept up, it scores other outputs (evals/greedy_standard.py)."""

    def __init__(self, server: Server, prompts, new_tokens: int, groups=(4,)):
        self.server, self.prompts = server, prompts
        self.alone = [server.generate(p, new_tokens, return_logprob=True) for p in prompts]
        self.batched = server.generate(prompts, new_tokens)
        self.grouped = [[o for i in range(0, len(prompts), g) for o in server.generate(prompts[i:i + g], new_tokens)]
                        for g in groups]

    def variants(self):
        return [output_ids(self.alone), output_ids(self.batched)] + [output_ids(g) for g in self.grouped]

    def bound(self, *more_variants):
        """The largest gap among the no-speculation outputs (these and any others given), scored here."""
        return greedy_standard.bound(self.server.post, self.prompts, self.variants() + list(more_variants))

    def judge(self, outputs, limit):
        return greedy_standard.judge(self.server.post, self.prompts, output_ids(self.alone), output_ids(outputs),
                                     limit)


def chain_budgets(entry: dict) -> list[int]:
    """Each request's draft budget in an iteration-log line of the plugin (chains: tree size - 1)."""
    return [n - 1 for n in entry["tree_sizes"]]
