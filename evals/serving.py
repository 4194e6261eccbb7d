"""Start and stop a server that speaks SGLang's /generate, and load it like SGLang's bench_serving:
Poisson arrivals (or all at once) with bounded concurrency, streamed responses, per-request timings.

Both targets of the evals go through this one client: the portable engine's server
(`python -m sglang_cascade.server`) and SGLang's own (`python -m sglang.launch_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], port: int, log_path, env: dict | None = None, timeout_s: float = 900):
    """Run `command` (a server listening on 127.0.0.1:port) until the block ends; its output goes to
    log_path. Raises with the log's tail if it exits or does not answer /health in time."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {proc.returncode} while starting: "
                                       f"{' '.join(command)}\n{_tail(log_path)}")
                if time.time() > deadline:
                    raise RuntimeError(f"server did not answer /health within {timeout_s:.0f} s\n{_tail(log_path)}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(1)
            yield f"http://127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _tail(path, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


@dataclass
class RequestSpec:
    rid: str
    workload: str
    text: str
    max_new_tokens: int
    arrival_s: float = 0.0  # offset from the start of the run


@dataclass
class RequestResult:
    rid: str
    workload: str
    text: str = ""
    output_ids: list[int] = field(default_factory=list)  # what greedy equality compares: text can hide a differing id
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    meta: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for one-token answers)."""
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def poisson_arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    """Arrival offsets of n requests: exponential gaps at `rate` per second; all at 0 when rate is None."""
    if not rate:
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def _one(session: aiohttp.ClientSession, url: str, spec: RequestSpec, start: float) -> RequestResult:
    res = RequestResult(spec.rid, spec.workload)
    body = {"text": spec.text, "rid": spec.rid, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": spec.max_new_tokens}}
    sent = time.perf_counter()
    try:
        async with session.post(f"{url}/generate", json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    break
                if not res.ttft_s:
                    res.ttft_s = time.perf_counter() - sent
                res.text, res.meta = chunk.get("text", res.text), chunk.get("meta_info", res.meta)
                # both servers stream the cumulative ids (SGLang unless --incremental-streaming-output)
                res.output_ids = list(chunk.get("output_ids", res.output_ids))
    except aiohttp.ClientError as e:
        res.error = f"{type(e).__name__}: {e}"
    res.latency_s = time.perf_counter() - sent
    res.output_tokens = int(res.meta.get("completion_tokens", 0))
    if res.error is None and len(res.output_ids) != res.output_tokens:
        # ids missing or streamed as deltas: comparing them would be meaningless, so say so
        res.error = f"stream carried {len(res.output_ids)} output ids for {res.output_tokens} completion tokens"
    return res


async def _run(url: str, specs: list[RequestSpec], concurrency: int, on_done) -> tuple[list[RequestResult], float]:
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=1800)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()

        async def go(spec):
            await asyncio.sleep(max(0.0, spec.arrival_s - (time.perf_counter() - start)))
            async with limit:
                r = await _one(session, url, spec, start)
            on_done()
            return r

        results = await asyncio.gather(*(go(s) for s in specs))
        return list(results), time.perf_counter() - start


def load(url: str, specs: list[RequestSpec], concurrency: int, on_done=lambda: None) -> tuple[list[RequestResult], float]:
    """Send every request (at its arrival time, at most `concurrency` in flight); (results, wall seconds)."""
    return asyncio.run(_run(url, specs, concurrency, on_done))
