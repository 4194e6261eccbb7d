"""What a newcomer trips on first: bad paths and ports fail as usage errors before anything loads,
and the real server answers (503, then 200) while its model loads, also to 50 connections at once.

Servers here run a tiny random Mixtral in --mode plain, so nothing waits for the default MoE: the
"first build of the default MoE" is staged by holding the build's own file lock in an empty
$SGLANG_CASCADE_HOME, then putting the tiny model in its place and releasing the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import select
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import requests

CLI = [sys.executable, "-m", "sglang_cascade.cli"]
MISSING = "/nonexistent"
STARTUP_S = 180   # a busy 2-core machine imports torch and transformers in two processes
BURST = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model_folder(path: pathlib.Path) -> pathlib.Path:
    """A tiny random Mixtral as transformers saves it, with a word-level tokenizer inside its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tiny_models import VOCAB, tiny_target
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", *"the a of to is def return Hi hello world".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    assert len(words) <= VOCAB
    tiny_target().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    return _tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)


def _assert_usage_error(r: subprocess.CompletedProcess, *needles: str):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for needle in needles:
        assert needle in r.stderr, r.stderr[-3000:]


# ---- 1, 2, 3: flag values that cannot work fail before anything loads ----

@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["generate", "--prompt", "hi"]])
def test_missing_model_path_is_a_usage_error(command):
    r = _cli(*command, "--model-path", MISSING)
    _assert_usage_error(r, f"--model-path {MISSING}", "config.json", "*.safetensors", "leave --model-path out",
                        "default MoE")
    assert "Repo id" not in r.stderr and "loading" not in r.stderr


def test_model_folder_without_weights_is_a_usage_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _assert_usage_error(_cli("generate", "--prompt", "hi", "--model-path", str(tmp_path)),
                        f"--model-path {tmp_path}", "*.safetensors")


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["generate", "--prompt", "hi"]])
def test_missing_draft_model_path_fails_before_the_target_loads(command, tiny_model):
    r = _cli(*command, "--model-path", str(tiny_model), "--draft-model-path", MISSING)
    _assert_usage_error(r, "--draft-model-path", f"no EAGLE-3 draft head at {MISSING} (config.json missing)",
                        "--mode plain")
    assert "loading" not in r.stderr


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_port_out_of_range_is_a_usage_error(port):
    _assert_usage_error(_cli("serve", "--port", port), "--port", "1 to 65535", port)


def test_port_0_serves_on_a_free_port_and_says_which(tiny_model, tmp_path):
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(CLI + ["serve", "--port", "0", "--mode", "plain", "--model-path", str(tiny_model)],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + STARTUP_S
        while not (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert int(m.group(1)) > 0
        r = requests.get(f"http://127.0.0.1:{m.group(1)}/health", timeout=30)
        assert r.status_code in (200, 503)
    finally:
        proc.terminate()
        proc.wait(60)


# ---- 4, 5: the real server answers while the default MoE "builds", and takes bursts ----

def _complete_default_moe(tiny_model: pathlib.Path, folder: pathlib.Path):
    """Put the tiny model where the default MoE goes, with the files that mark a finished build."""
    from sglang_cascade.models.default_model import RECIPE, REQUIRED_FILES
    from sglang_cascade.target_digest import record_digest

    tmp = folder.with_name(folder.name + ".staging")
    tmp.mkdir()
    for f in tiny_model.iterdir():
        (tmp / f.name).write_bytes(f.read_bytes())
    record_digest(tmp)
    (tmp / "generation_config.json").write_text("{}")
    (tmp / "moefy_stats.json").write_text(json.dumps({"recipe": RECIPE}))
    assert all((tmp / name).is_file() for name in REQUIRED_FILES)
    os.rename(tmp, folder)


@pytest.fixture(scope="module")
def building_server(tiny_model, tmp_path_factory):
    """A server whose default MoE is 'being built': we hold the build lock until release() is called."""
    from sglang_cascade.models.default_model import MODEL_DIR_NAME

    home = tmp_path_factory.mktemp("home")
    lock = open(home / f".{MODEL_DIR_NAME}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    port, log = _free_port(), home / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(CLI + ["serve", "--host", "127.0.0.1", "--port", str(port), "--mode", "plain",
                                       "--context-length", "256"],
                                stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "SGLANG_CASCADE_HOME": str(home)})

    def release():
        if not lock.closed:
            _complete_default_moe(tiny_model, home / MODEL_DIR_NAME)
            lock.close()   # drops the flock: the server's build step finds the folder complete

    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, proc=proc, log=log, release=release)
    release()
    proc.terminate()
    proc.wait(60)


def _first_answer(server, path: str) -> requests.Response:
    """The first answer the server gives (it may still be importing torch when we start asking)."""
    deadline = time.time() + STARTUP_S
    while True:
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        try:
            return requests.get(server.url + path, timeout=5)
        except requests.RequestException as e:
            assert time.time() < deadline, f"no answer on {path} within {STARTUP_S} s ({e})"
            time.sleep(1)


def _assert_loading(r: requests.Response, *needles: str):
    assert r.status_code == 503, (r.status_code, r.text)
    body = r.json()
    assert body["status"] == "loading"
    for needle in needles:
        assert needle in body["error"]["message"], body


def test_server_answers_503_while_the_default_moe_builds_then_serves(building_server):
    server = building_server
    _assert_loading(_first_answer(server, "/health"), "loading", "being built", "minutes")
    _assert_loading(requests.get(server.url + "/health_generate", timeout=30), "being built")
    _assert_loading(requests.get(server.url + "/get_model_info", timeout=30))
    _assert_loading(requests.post(server.url + "/generate", json={"text": "hello"}, timeout=30), "loading")
    server.release()
    deadline = time.time() + STARTUP_S
    while (r := requests.get(server.url + "/health", timeout=30)).status_code != 200:
        assert server.proc.poll() is None and time.time() < deadline, server.log.read_text()[-3000:]
        _assert_loading(r)
        time.sleep(0.5)
    assert requests.get(server.url + "/health_generate", timeout=60).status_code == 200
    assert requests.get(server.url + "/get_model_info", timeout=30).json()["is_generation"] is True
    out = requests.post(server.url + "/generate", timeout=60,
                        json={"text": "hello world", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert out.status_code == 200 and len(out.json()["output_ids"]) == 4, out.text


def test_fifty_connections_at_once_all_answered(building_server):
    """50 clients connect while the accept loop cannot run (the server is stopped: what a burst on a
    busy machine does by chance), then all send GET /health: each must connect and get 200. The
    kernel completes handshakes only up to the listen backlog without the server's help."""
    server = building_server
    server.release()
    deadline = time.time() + STARTUP_S
    while _first_answer(server, "/health").status_code != 200:
        assert time.time() < deadline
        time.sleep(0.5)
    socks = [socket.socket() for _ in range(BURST)]
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        for s in socks:
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", server.port))
        deadline = time.time() + 3   # past the first SYN retransmission (1 s)
        pending = set(socks)
        while pending and time.time() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.1)
            pending -= set(writable)
        connected = [s for s in socks if s not in pending and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    try:
        assert len(connected) == BURST, f"only {len(connected)} of {BURST} connections were accepted"
        for s in socks:
            s.setblocking(True)
            s.settimeout(60)
            s.sendall(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        status = [s.makefile("rb").readline() for s in socks]
        assert all(line.split()[1:2] == [b"200"] for line in status), status
    finally:
        for s in socks:
            s.close()
