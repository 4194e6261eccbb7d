"""Start the scheduler process and the HTTP front end; stop both on SIGINT / SIGTERM.

Mirrors `python -m sglang.launch_server`: the engine loads in a spawned process while the front end
already answers (503 "loading" until the engine is ready), then serves until a signal arrives or the
scheduler dies.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import shutil
import signal
import sys
import tempfile
import threading

from sglang_cascade.engine import EngineConfig
from sglang_cascade.server.http_server import CascadeHTTPServer, SchedulerClient
from sglang_cascade.server.protocol import Shutdown
from sglang_cascade.server.scheduler import run_scheduler

logger = logging.getLogger("sglang_cascade.server")


def _port(text: str) -> int:
    """argparse type: 1..65535, or 0 for any free port (the server logs which it got)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, or 0 for any free one (got {text})")
    return port


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=30000,
                        help="port to listen on, 0 for any free one (default 30000)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model id of the OpenAI API (/v1/models; default: the model path), as SGLang's")
    parser.add_argument("--iteration-log", default=None, metavar="FILE",
                        help="append one JSON line per engine iteration to FILE (what evals/ plot)")
    EngineConfig.add_cli_args(parser)
    return parser


def _wait_ready(proc, conn, stop: threading.Event) -> dict | None:
    """The scheduler's ready payload, or None if it failed, died or we were told to stop."""
    while not stop.is_set():
        if conn.poll(0.5):
            try:
                status, payload = conn.recv()
            except EOFError:
                status, payload = "error", "the scheduler process closed its pipe without reporting"
            if status == "ready":
                return payload
            logger.error("the engine failed to load:\n%s", payload)
            return None
        if not proc.is_alive():
            logger.error("the scheduler process exited with code %s while loading", proc.exitcode)
            return None
    return None


def loading_message(cfg: EngineConfig) -> str:
    """What every endpoint answers (503) while the engine loads; the default MoE's first build takes minutes."""
    if cfg.target_path is None:
        from sglang_cascade.models.default_model import default_moe_dir, is_complete
        if not is_complete(default_moe_dir()):
            return ("the model is loading: the embedded default MoE is being built on first use (a few minutes, "
                    f"once, into {default_moe_dir()}); retry when /health answers 200")
    return "the model is loading; retry when /health answers 200"


def launch_server(args: argparse.Namespace) -> int:
    """Serve until SIGINT / SIGTERM (exit code 0) or until the scheduler dies (1)."""
    cfg = EngineConfig.from_cli_args(args)
    try:  # bind first: a busy port fails before the models load
        server = CascadeHTTPServer(args.host, args.port, loading=lambda: loading_message(cfg),
                                   served_model_name=args.served_model_name)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
    url = f"http://{args.host}:{server.server_port}"
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()   # answers 503 "loading" until attach()
    ipc_dir = tempfile.mkdtemp(prefix="sglang-cascade-")
    in_addr, out_addr = f"ipc://{ipc_dir}/in", f"ipc://{ipc_dir}/out"
    ctx = mp.get_context("spawn")
    ready_r, ready_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_scheduler, args=(cfg, in_addr, out_addr, ready_w, args.iteration_log),
                       name="cascade-scheduler")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    proc.start()
    ready_w.close()
    client = None
    try:
        logger.info("listening on %s; loading the engine (mode %s) in the scheduler process", url, cfg.mode)
        info = _wait_ready(proc, ready_r, stop)
        if info is None:
            return 0 if stop.is_set() else 1
        client = SchedulerClient(in_addr, out_addr, alive=proc.is_alive)
        server.attach(client, **info)
        logger.info("The server is fired up and ready to roll! URL: %s", url)
        while not stop.wait(0.5):
            if not proc.is_alive():
                logger.error("the scheduler process exited with code %s; shutting down", proc.exitcode)
                return 1
        logger.info("shutting down")
        return 0
    finally:
        server.shutdown()
        server.server_close()
        if client and proc.is_alive():
            client.send(Shutdown())
            proc.join(10)
        if proc.is_alive():  # still loading, or stuck in a step
            proc.terminate()
            proc.join(5)
        if client:
            client.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Check the flags (a bad value is a usage error, before any model loads), then serve and exit."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stderr)
    try:
        EngineConfig.from_cli_args(args)
    except ValueError as e:
        parser.error(str(e))
    sys.exit(launch_server(args))


def main(argv=None):
    parser = add_server_args(argparse.ArgumentParser(
        prog="python -m sglang_cascade.server",
        description="SGLang-compatible HTTP server (POST /generate, ...) for the portable Cascade engine."))
    serve(parser.parse_args(argv), parser)
