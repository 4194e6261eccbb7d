"""Start the scheduler process and the HTTP front end; stop both on SIGINT / SIGTERM.

Mirrors `python -m sglang.launch_server`: the engine loads in a spawned process while the front end
waits, then the front end serves until a signal arrives or the scheduler dies.
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


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000, help="port to listen on (default 30000)")
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


def launch_server(args: argparse.Namespace) -> int:
    """Serve until SIGINT / SIGTERM (exit code 0) or until the scheduler dies (1)."""
    cfg = EngineConfig.from_cli_args(args)
    try:  # bind first: a busy port fails before the models load
        server = CascadeHTTPServer(args.host, args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        return 1
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
    client = serving = None
    try:
        logger.info("loading the engine (mode %s) in the scheduler process", cfg.mode)
        info = _wait_ready(proc, ready_r, stop)
        if info is None:
            return 0 if stop.is_set() else 1
        client = SchedulerClient(in_addr, out_addr, alive=proc.is_alive)
        server.attach(client, **info)
        serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
        serving.start()
        logger.info("The server is fired up and ready to roll! URL: http://%s:%d", args.host, args.port)
        while not stop.wait(0.5):
            if not proc.is_alive():
                logger.error("the scheduler process exited with code %s; shutting down", proc.exitcode)
                return 1
        logger.info("shutting down")
        return 0
    finally:
        if serving:
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
