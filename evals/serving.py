"""Start and stop a server, and load it as users do: chat requests through the OpenAI-compatible
/v1/chat/completions (the server applies the model's chat template) and completions through SGLang's
/generate, streamed, at most `concurrency` requests in flight (a closed loop), with per-request
timings, the speculative figures and the output token ids.

Both targets of the evals go through this one client: the portable engine's server
(`python -m sglang_cascade.server`) and SGLang's own (`python -m sglang.launch_server`). Where the
ids come from: /generate streams them, and a chat stream carries them in `sglext.output_ids` when
asked with SGLang's `return_output_ids_in_sglext` (both servers). Completions go through /generate,
not /v1/completions, because there both servers return exact ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import aiohttp

IDS_FIELD = "return_output_ids_in_sglext"
ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/generate"}


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
    format: str = "completion"  # "chat": the text is the user's message; "completion": the raw prompt


@dataclass
class RequestResult:
    rid: str
    workload: str
    format: str = "completion"
    text: str = ""
    output_ids: list[int] = field(default_factory=list)  # what greedy equality compares: text can hide a differing id
    output_tokens: int = 0
    finish_reason: str | None = None
    ttft_s: float = 0.0
    latency_s: float = 0.0
    meta: dict = field(default_factory=dict)  # the speculative figures (spec_verify_ct, ...) and the counts
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for one-token answers)."""
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def _body(spec: RequestSpec) -> dict:
    if spec.format == "completion":
        return {"text": spec.text, "rid": spec.rid, "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": spec.max_new_tokens}}
    return {"messages": [{"role": "user", "content": spec.text}], "rid": spec.rid, "stream": True,
            "max_tokens": spec.max_new_tokens, "temperature": 0, "stream_options": {"include_usage": True},
            "return_spec_tokens_details": True, IDS_FIELD: True}


def _take(res: RequestResult, chunk: dict, chat: bool) -> None:
    """One streamed event into the result. /generate streams cumulative text, ids (SGLang unless
    --incremental-streaming-output) and meta_info; a chat stream sends text deltas, then the finish
    reason, sglext (speculative figures, ids) and a usage chunk, in one or several events."""
    if not chat:
        res.text, res.meta = chunk.get("text", res.text), chunk.get("meta_info", res.meta)
        res.output_ids = list(chunk.get("output_ids", res.output_ids))
        res.output_tokens = int(res.meta.get("completion_tokens", 0))
        res.finish_reason = (res.meta.get("finish_reason") or {}).get("type")
        return
    for choice in chunk.get("choices") or []:
        res.text += choice.get("delta", {}).get("content") or ""
        res.finish_reason = choice.get("finish_reason") or res.finish_reason
    ext = chunk.get("sglext") or {}
    res.meta.update(ext.get("spec_tokens_details") or {})
    if ext.get("output_ids"):
        res.output_ids = list(ext["output_ids"][0])
    if chunk.get("usage"):
        res.output_tokens = int(chunk["usage"]["completion_tokens"])
        res.meta["completion_tokens"] = res.output_tokens


async def _one(session: aiohttp.ClientSession, url: str, spec: RequestSpec) -> RequestResult:
    res, chat = RequestResult(spec.rid, spec.workload, spec.format), spec.format == "chat"
    sent = time.perf_counter()
    try:
        async with session.post(url + ENDPOINTS[spec.format], json=_body(spec)) as resp:
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
                if not res.ttft_s and (chunk.get("choices") or not chat):
                    res.ttft_s = time.perf_counter() - sent
                _take(res, chunk, chat)
    except aiohttp.ClientError as e:
        res.error = f"{type(e).__name__}: {e}"
    res.latency_s = time.perf_counter() - sent
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
            async with limit:
                r = await _one(session, url, spec)
            on_done()
            return r

        results = await asyncio.gather(*(go(s) for s in specs))
        return list(results), time.perf_counter() - start


def load(url: str, specs: list[RequestSpec], concurrency: int, on_done=lambda: None
         ) -> tuple[list[RequestResult], float]:
    """Send every request, in order, at most `concurrency` in flight (each finished one lets the next
    in: a steady stream); (results, wall seconds)."""
    return asyncio.run(_run(url, specs, concurrency, on_done))
