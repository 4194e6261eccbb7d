"""HTTP front end speaking SGLang's native API (`/generate`, `/health`, `/get_model_info`, ...) and
its OpenAI-compatible one (`/v1/chat/completions`, `/v1/completions`, `/v1/models`: openai_api.py).

Runs in the launching process: it tokenises, forwards requests to the scheduler process over ZMQ,
detokenises incrementally, applies stop strings, and answers plain JSON or SSE streams shaped like
SGLang's, so `sgl.RuntimeEndpoint`, SGLang HTTP clients and OpenAI clients work unchanged. Errors
have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, on every endpoint.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import zmq

import sglang_cascade
from sglang_cascade.engine import GenerationRequest, SamplingParams
from sglang_cascade.server import openai_api
from sglang_cascade.server.protocol import (
    Abort, BadRequest, Failed, IncrementalDetokenizer, Item, Submit, Submitted, parse_generate)

logger = logging.getLogger("sglang_cascade.http")


class ServerError(RuntimeError):
    """The engine, not the request, failed: HTTP 500."""


class SchedulerClient:
    """The front end's end of the ZMQ link.

    One PUSH socket (shared by the handler threads under a lock) and one receiver thread that
    routes each scheduler message to the queue of the HTTP call that owns the request id.
    """

    def __init__(self, in_addr: str, out_addr: str, alive):
        self.alive = alive
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.bind(in_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(out_addr)
        self._lock = threading.Lock()
        self._routes: dict[str, queue.Queue] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._recv_loop, name="zmq-recv", daemon=True)
        self._thread.start()

    def submit(self, reqs) -> queue.Queue:
        q = queue.Queue()
        with self._lock:
            taken = [r.rid for r in reqs if r.rid in self._routes]
            if taken:
                raise BadRequest(f"rid {taken[0]!r} is already running; give each request a distinct rid")
            self._routes.update((r.rid, q) for r in reqs)
            self._push.send_pyobj(Submit(list(reqs)))
        return q

    def release(self, rids, abort: bool):
        """Stop routing these rids; with abort, also tell the scheduler to drop them."""
        with self._lock:
            known = [rid for rid in rids if self._routes.pop(rid, None) is not None]
            if abort and known:
                self._push.send_pyobj(Abort(known))

    def send(self, msg):
        with self._lock:
            self._push.send_pyobj(msg)

    def _recv_loop(self):
        while not self._closed.is_set():
            if not self._pull.poll(200):
                continue
            msg = self._pull.recv_pyobj()
            with self._lock:
                if isinstance(msg, list):
                    for out in msg:
                        self._put(out.rid, out)
                elif isinstance(msg, Submitted):
                    self._put(msg.rids[0], msg)
                elif isinstance(msg, Failed):
                    for q in {id(q): q for q in map(self._routes.get, msg.rids) if q}.values():
                        q.put(msg)

    def _put(self, rid, msg):
        q = self._routes.get(rid)
        if q is not None:
            q.put(msg)

    def close(self):
        self._closed.set()
        self._thread.join()
        self._ctx.destroy(linger=0)


class Generation:
    """One prompt's output as it grows: ids, text (stop strings applied), finish reason, meta."""

    def __init__(self, item: Item, tokenizer):
        self.item, self.rid = item, item.req.rid
        self.detok = IncrementalDetokenizer(tokenizer, item.skip_special_tokens)
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: dict | None = None
        self.engine_meta: dict = {}
        self.start = time.time()
        self.latency = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, out) -> bool:
        """Apply one StepOutput; True when a stop string ended the request (the engine must drop it)."""
        self.output_ids += out.new_token_ids
        self.engine_meta = out.meta or {}
        ids = out.new_token_ids
        matched = (out.finish_reason or {}).get("matched")
        if out.finished and isinstance(matched, int) and not self.item.no_stop_trim and ids and ids[-1] == matched:
            ids = ids[:-1]  # as SGLang: the matched stop token is not part of the text
        text = self.detok.add(ids)
        if out.finished:
            text = self.detok.flush()
        hits = [(text.find(s), s) for s in self.item.stop if s in text]
        if hits:
            pos, s = min(hits)
            self.text = text[:pos + (len(s) if self.item.no_stop_trim else 0)]
            self._finish({"type": "stop", "matched": s})
            return not out.finished
        self.text = text
        if out.finished:
            self._finish(out.finish_reason or {"type": "length", "length": len(self.output_ids)})
        return False

    def finish_empty(self):
        """max_new_tokens 0 (the SGLang frontend's prefix-caching call): nothing to generate."""
        self._finish({"type": "length", "length": 0})

    def _finish(self, reason: dict):
        self.finish_reason = reason
        self.latency = time.time() - self.start

    def result(self) -> dict:
        meta = {"spec_verify_ct": 0, "spec_accept_length": 0.0, "cascade": {}, **self.engine_meta,
                "id": self.rid, "prompt_tokens": len(self.item.req.input_ids),
                "completion_tokens": len(self.output_ids), "finish_reason": self.finish_reason,
                "e2e_latency": self.latency if self.finished else time.time() - self.start}
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}


class CascadeHTTPServer(ThreadingHTTPServer):
    """Serves from the moment it binds: until attach(), every endpoint answers 503 with `loading()`'s
    message (SGLang's /health is 503 while the server starts), so clients can tell a loading server
    from a dead one."""

    daemon_threads = True  # a stuck client never holds up shutdown
    # listen backlog: socketserver's default of 5 drops connections of a burst of clients that arrive
    # faster than the accept loop runs (uvicorn, under SGLang, uses 2048)
    request_queue_size = 1024

    def __init__(self, host: str, port: int, loading=lambda: "the model is loading",
                 served_model_name: str | None = None):
        super().__init__((host, port), Handler)
        self.client: SchedulerClient | None = None
        self.loading = loading
        self.served_model_name = served_model_name
        self.created = int(time.time())

    def attach(self, client: SchedulerClient, tokenizer, model_info: dict, server_info: dict):
        """Called once the scheduler is ready; the endpoints then stop answering 503 "loading"."""
        self.tokenizer, self.model_info = tokenizer, model_info
        self.server_info = {**server_info, "version": sglang_cascade.__version__}
        # OpenAI's model id; SGLang's --served-model-name defaults to the model path too
        self.served_model_name = self.served_model_name or str(model_info.get("model_path") or "default")
        self.client = client   # last: handler threads read a set client as "everything is ready"

    def wait(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                if not self.client.alive():
                    raise ServerError("the scheduler process has exited; see the server log and restart it")

    def run(self, items: list[Item], on_update=None) -> list[Generation]:
        """Generate all items; on_update(index, generation) is called after each change.

        Nothing is reported before the scheduler has accepted the whole batch, so a stream
        can still answer a refused request with a plain HTTP 400.
        """
        gens = [Generation(it, self.tokenizer) for it in items]
        live = {g.rid: (i, g) for i, g in enumerate(gens) if g.item.req.sampling.max_new_tokens != 0}
        for g in gens:
            if g.rid not in live:
                g.finish_empty()
        q = self.client.submit([g.item.req for _, g in live.values()]) if live else None
        pending = set(live)
        try:
            if q is not None:
                ack = self.wait(q)
                if ack.error:
                    pending.clear()
                    raise (BadRequest if ack.bad_request else ServerError)(ack.error)
            for i, g in enumerate(gens):
                if on_update and g.finished:
                    on_update(i, g)
            while pending:
                msg = self.wait(q)
                if isinstance(msg, Failed):
                    pending.clear()
                    raise ServerError(msg.error)
                i, g = live[msg.rid]
                if g.finished:
                    continue
                if g.update(msg):
                    self.client.send(Abort([g.rid]))
                if g.finished:
                    pending.discard(g.rid)
                if on_update:
                    on_update(i, g)
        finally:
            self.client.release(list(live), abort=bool(pending))
        return gens


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               500: "server_error", 503: "service_unavailable"}


def _error(message: str, status: int = 400, param: str | None = None) -> dict:
    """OpenAI's error shape; SGLang's native clients read error.message, which it keeps."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": None}}


class Handler(BaseHTTPRequestHandler):
    server: CascadeHTTPServer
    server_version = "sglang-cascade"

    def log_message(self, fmt, *args):
        logger.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str):
        path = urlsplit(self.path).path.rstrip("/")
        route = ROUTES.get(path)
        if route is None:
            return self._json(404, _error(f"unknown endpoint {path!r}; available: {', '.join(sorted(ROUTES))}", 404))
        methods, fn = route
        if method not in methods:
            return self._json(405, _error(f"{path} accepts {' or '.join(methods)}, not {method}", 405))
        if self.server.client is None:
            return self._json(503, {"status": "loading", **_error(self.server.loading(), 503)})
        try:
            fn(self)
        except BadRequest as e:
            self._json(400, _error(str(e), 400, e.param))
        except ServerError as e:  # the scheduler has logged the cause
            self._json(500, _error(str(e), 500))
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client went away")
        except Exception as e:
            logger.exception("request %s failed", path)
            self._json(500, _error(f"{type(e).__name__}: {e}", 500))

    def _body(self, example: str = '{"text": "Hello", "sampling_params": {"max_new_tokens": 16}}'):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON body ({e}); send a JSON object such as {example}") from None

    def _send(self, status: int, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode(), "application/json")

    # ---- endpoints ----

    def health(self):
        ok = self.server.client.alive()
        self._send(200 if ok else 503, b"" if ok else b"scheduler process is not running", "text/plain")

    def health_generate(self):
        sampling = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        req = GenerationRequest(rid=f"health-{time.time_ns()}", input_ids=self.server.tokenizer.encode("Hi") or [0],
                                sampling=sampling)
        try:
            self.server.run([Item(req)])
        except (BadRequest, ServerError) as e:
            return self._send(503, str(e).encode(), "text/plain")
        self._send(200, b"", "text/plain")

    def get_model_info(self):
        self._json(200, self.server.model_info)

    def get_server_info(self):
        self._json(200, self.server.server_info)

    def flush_cache(self):
        self._send(200, b"Cache flushed.\n(sglang-cascade keeps no prefix cache across requests: nothing to do.)\n",
                   "text/plain")

    def abort_request(self):
        body = self._body()
        rid = body.get("rid") if isinstance(body, dict) else None
        if not isinstance(rid, str):
            raise BadRequest('send {"rid": "<request id>"} to abort a running request')
        self.server.client.release([rid], abort=True)
        self._send(200, b"", "text/plain")

    def generate(self):
        items, is_batch, stream = parse_generate(self._body(), self.server.tokenizer)
        if not stream:
            gens = self.server.run(items)
            results = [g.result() for g in gens]
            return self._json(200, results if is_batch else results[0])
        # SSE as SGLang: cumulative `text`/`output_ids` per chunk, `index` in batches, then [DONE]
        self.sse(items, lambda i, g: [g.result() | ({"index": i} if is_batch else {})])

    def sse(self, items: list[Item], chunks):
        """Run items and stream `data: <json>` events, chunks(index, generation) giving those of each
        update, then `data: [DONE]`. Headers go out with the first update, so a request the scheduler
        refuses still gets a plain 400; a later failure becomes an error event before [DONE]."""
        started = False

        def emit(i, g):
            nonlocal started
            if not started:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                started = True
            for chunk in chunks(i, g):
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

        try:
            self.server.run(items, on_update=emit)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:
            if not started:
                raise  # nothing sent yet: a plain 400 / 500
            if not isinstance(e, (BadRequest, ServerError)):
                logger.exception("stream failed")
            status = 400 if isinstance(e, BadRequest) else 500
            self.wfile.write(b"data: " + json.dumps(_error(str(e), status)).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


ROUTES = {
    "/health": (("GET",), Handler.health),
    "/health_generate": (("GET",), Handler.health_generate),
    "/get_model_info": (("GET",), Handler.get_model_info),
    "/model_info": (("GET",), Handler.get_model_info),
    "/get_server_info": (("GET",), Handler.get_server_info),
    "/server_info": (("GET",), Handler.get_server_info),
    "/flush_cache": (("GET", "POST"), Handler.flush_cache),
    "/abort_request": (("POST",), Handler.abort_request),
    "/generate": (("POST", "PUT"), Handler.generate),
    "/v1/chat/completions": (("POST",), openai_api.chat_completions),
    "/v1/completions": (("POST",), openai_api.completions),
    "/v1/models": (("GET",), openai_api.models),
}
