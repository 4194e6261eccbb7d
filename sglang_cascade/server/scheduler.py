"""The engine process: owns the models and runs `engine.step()` whenever there is work.

It lives in its own process, as SGLang's scheduler does, so that a step of up to a second never
blocks the HTTP front end. Requests arrive on a ZMQ PULL socket between steps; results leave on a
PUSH socket. A bad request or an engine exception fails only the requests concerned.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import traceback

import zmq

from sglang_cascade.server.protocol import Abort, Failed, Shutdown, Submit, Submitted
from sglang_cascade.target_digest import TargetMismatch

logger = logging.getLogger("sglang_cascade.scheduler")


class Scheduler:
    def __init__(self, engine, in_addr: str, out_addr: str, iteration_log: str | None = None):
        self.engine = engine
        # one JSON line per engine iteration (wall time, batch, configs, distinct experts): the evals'
        # view of what the policy did, written as it happens so a killed server loses nothing
        self.iteration_log = open(iteration_log, "a", buffering=1) if iteration_log else None
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.connect(in_addr)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(out_addr)
        self.active: set[str] = set()  # rids added to the engine and not finished or aborted

    def run(self):
        """Serve until a Shutdown message arrives or the parent process goes away."""
        parent = os.getppid()
        try:
            while os.getppid() == parent:
                timeout = 0 if self.engine.has_work() else 500
                while self.pull.poll(timeout):
                    if not self.handle(self.pull.recv_pyobj()):
                        return
                    timeout = 0
                if self.engine.has_work():
                    self.step()
        finally:
            self.ctx.destroy(linger=0)
            if self.iteration_log:
                self.iteration_log.close()

    def handle(self, msg) -> bool:
        """Apply one message from the front end; False means shut down."""
        if isinstance(msg, Shutdown):
            return False
        if isinstance(msg, Abort):
            for rid in msg.rids:
                self._abort(rid)
        elif isinstance(msg, Submit):
            self.push.send_pyobj(self.submit(msg))
        else:
            logger.error("ignoring unknown message %r", msg)
        return True

    def submit(self, msg: Submit) -> Submitted:
        rids = [r.rid for r in msg.reqs]
        try:
            for req in msg.reqs:
                self.engine.validate(req)
        except ValueError as e:
            return Submitted(rids, str(e))
        except Exception as e:
            logger.exception("validation raised")
            return Submitted(rids, f"{type(e).__name__}: {e}", bad_request=False)
        added = []
        try:
            for req in msg.reqs:
                self.engine.add_request(req)
                added.append(req.rid)
                self.active.add(req.rid)
        except Exception as e:
            logger.exception("add_request raised")
            for rid in added:
                self._abort(rid)
            return Submitted(rids, f"{type(e).__name__}: {e}", bad_request=isinstance(e, ValueError))
        return Submitted(rids)

    def step(self):
        try:
            outs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; dropping the running requests")
            failed = sorted(self.active)
            for rid in failed:
                self._abort(rid)
            self.push.send_pyobj(Failed(failed, f"engine step failed: {type(e).__name__}: {e}"))
            return
        if self.iteration_log:
            for entry in self.engine.iteration_log:
                self.iteration_log.write(json.dumps(entry) + "\n")
            self.engine.iteration_log.clear()
        for out in outs:
            if out.finished:
                self.active.discard(out.rid)
        if outs:
            self.push.send_pyobj(outs)

    def _abort(self, rid: str):
        self.active.discard(rid)
        try:
            self.engine.abort(rid)
        except Exception:  # already finished or never added: nothing to abort
            logger.debug("abort of %s ignored", rid, exc_info=True)


def run_scheduler(engine_config, in_addr: str, out_addr: str, ready_conn, iteration_log: str | None = None):
    """Process entry point: load the engine, report readiness (or the load error), then serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent shuts us down
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s scheduler] %(message)s")
    try:
        from sglang_cascade.engine import Engine
        engine = Engine(engine_config)
        info = {"tokenizer": engine.tokenizer, "model_info": engine.model_info(),
                "server_info": engine.server_info()}
    except TargetMismatch as e:   # the user's refusal (--strict-target-hash), not a fault: no traceback
        ready_conn.send(("error", str(e)))
        return
    except BaseException:
        ready_conn.send(("error", traceback.format_exc()))
        return
    ready_conn.send(("ready", info))
    ready_conn.close()
    Scheduler(engine, in_addr, out_addr, iteration_log).run()
