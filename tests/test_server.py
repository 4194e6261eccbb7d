"""The SGLang-compatible server: request parsing in-process, then the real server over HTTP.

The HTTP tests start `python -m sglang_cascade.server` once (module fixture) on a free port and
drive it as SGLang clients do: raw `requests`, and the SGLang frontend language when installed.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import requests
from engine_server import CharTokenizer, engine_server

from sglang_cascade.controller import CascadeConfig, SpecConfig
from sglang_cascade.engine import StepOutput
from sglang_cascade.server.http_server import Generation
from sglang_cascade.server.protocol import BadRequest, IncrementalDetokenizer, parse_generate

MAX_NEW = 8
MAX_STEPS = max(c.steps for c in CascadeConfig().ladder)   # the deepest draft of the server's default ladder


# ---- request parsing and output assembly (no model) ----

def test_parse_single_batch_and_defaults():
    tok = CharTokenizer()
    items, is_batch, stream = parse_generate({"text": "ab"}, tok)
    assert (is_batch, stream) == (False, False)
    assert items[0].req.input_ids == [97, 98]
    assert items[0].req.sampling.temperature == 1.0 and items[0].req.sampling.max_new_tokens == 128  # SGLang's
    items, is_batch, _ = parse_generate(
        {"input_ids": [[1], [2, 3]], "rid": ["x", "y"],
         "sampling_params": {"max_new_tokens": 4, "stop": "\n", "stop_token_ids": [7], "temperature": 0}}, tok)
    assert is_batch and [it.req.rid for it in items] == ["x", "y"]
    assert items[1].stop == ["\n"] and items[1].req.sampling.stop_token_ids == [7]
    # What sgl.RuntimeEndpoint sends for a plain sgl.gen: empty lists and nulls for unused features.
    frontend = {"max_new_tokens": 4, "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [],
                "stop_regex": [], "temperature": 0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False, "regex": None,
                "json_schema": None, "skip_special_tokens": True, "spaces_between_special_tokens": True}
    parse_generate({"text": "q", "sampling_params": frontend}, tok)


@pytest.mark.parametrize("body, needle", [
    ([1, 2], "JSON object"),
    ({"sampling_params": {}}, "exactly one of"),
    ({"text": ""}, "empty"),
    ({"text": "a", "sampling_params": {"max_new_token": 4}}, "unknown sampling param 'max_new_token'"),
    ({"text": "a", "sampling_params": {"regex": "a+"}}, "constrained decoding"),
    ({"text": "a", "sampling_params": {"max_new_tokens": "4"}}, "max_new_tokens must be an integer"),
    ({"text": "a", "return_logprob": True}, "'return_logprob'"),
    ({"input_ids": [1, "2"]}, "input_ids"),
    ({"text": ["a", "b"], "rid": "r"}, "one entry per prompt"),
])
def test_parse_rejects_with_a_clear_message(body, needle):
    with pytest.raises(BadRequest) as e:
        parse_generate(body, CharTokenizer())
    assert needle in str(e.value)


def _item(sampling_params):
    return parse_generate({"text": "p", "sampling_params": sampling_params}, CharTokenizer())[0][0]


def test_stop_string_trims_text_and_asks_for_abort():
    g = Generation(_item({"stop": ["lo w"], "max_new_tokens": 20}), CharTokenizer())
    assert not g.update(StepOutput("r", [ord(c) for c in "hel"], False, None, {}))
    assert g.update(StepOutput("r", [ord(c) for c in "lo world"], False, None, {"spec_verify_ct": 2}))
    assert g.text == "hel" and g.finish_reason == {"type": "stop", "matched": "lo w"}
    meta = g.result()["meta_info"]
    assert meta["completion_tokens"] == 11 and meta["spec_verify_ct"] == 2


def test_matched_stop_token_is_not_in_the_text():
    g = Generation(_item({"max_new_tokens": 20}), CharTokenizer())
    g.update(StepOutput("r", [104, 105, 33], True, {"type": "stop", "matched": 33}, {}))
    assert g.text == "hi" and g.output_ids == [104, 105, 33]


def test_detokenizer_holds_back_incomplete_characters():
    class ByteTokenizer(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    d = IncrementalDetokenizer(ByteTokenizer())
    euro = list("€".encode())
    assert d.add([104]) == "h"
    assert d.add(euro[:2]) == "h"
    assert d.add(euro[2:]) == "h€"
    assert d.add(euro[:1]) == "h€" and d.flush() == "h€\ufffd"


# ---- the real server ----

def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with engine_server(tmp_path_factory.mktemp("server") / "server.log", "--context-length", "512") as srv:
        yield srv


def _generate(server, **body):
    body.setdefault("sampling_params", {"max_new_tokens": MAX_NEW, "temperature": 0})
    r = requests.post(server.url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _check_counts(meta, finished: bool, max_steps: int = MAX_STEPS):
    """The engine's accounting: the prefill emits one token and each verify its accepted drafts plus a
    bonus token, so completion_tokens - 1 == verify count + accepted drafts until the last verify, which
    may be cut short (a stop token, max_new_tokens) by at most its draft steps."""
    done, verifies, accepted = meta["completion_tokens"], meta["spec_verify_ct"], meta["spec_accepted_drafts"]
    assert 0 <= accepted <= max_steps * verifies, meta
    if verifies:
        assert meta["spec_accept_length"] == pytest.approx((done - 1) / verifies), meta
    if not finished:
        assert done == 1 + verifies + accepted, meta
    else:
        assert verifies <= done - 1 <= verifies + accepted <= done - 1 + max_steps, meta


def _check_result(res, max_steps: int = MAX_STEPS):
    meta = res["meta_info"]
    assert isinstance(res["text"], str) and 0 < len(res["output_ids"]) <= MAX_NEW
    assert meta["completion_tokens"] == len(res["output_ids"]) and meta["prompt_tokens"] > 0
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["e2e_latency"] > 0
    assert meta["spec_verify_ct"] >= 1
    _check_counts(meta, finished=True, max_steps=max_steps)
    assert isinstance(meta["cascade"], dict) and meta["id"]


@pytest.mark.slow
def test_single_and_batched_agree(server):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    singles = [_generate(server, text=p) for p in prompts]
    batch = _generate(server, text=prompts)
    assert isinstance(batch, list) and len(batch) == 2
    for s, b in zip(singles, batch):
        _check_result(s)
        _check_result(b)
        assert s["output_ids"] == b["output_ids"]  # greedy is lossless and batch-invariant


@pytest.mark.slow
def test_stream_matches_non_stream(server):
    body = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}}
    full = _generate(server, **body)
    r = requests.post(server.url + "/generate", json=body | {"stream": True}, stream=True, timeout=300)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    lines = [ln.decode() for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert all(a["text"] == b["text"][:len(a["text"])] for a, b in zip(chunks, chunks[1:]))  # cumulative
    for c in chunks:
        _check_counts(c["meta_info"], finished=c["meta_info"]["finish_reason"] is not None)
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    _check_result(chunks[-1])


def _stream(server, body):
    r = requests.post(server.url + "/generate", json=body | {"stream": True}, stream=True, timeout=300)
    assert r.status_code == 200, r.text
    lines = [ln.decode() for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


SPEC_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4, 5,",
                "Name: Alice. Age: 30. Name: Bob. Age:"]


@pytest.mark.slow
def test_static_drafts_are_accepted_and_counted(server):
    """The default head on the default MoE, each request on a static 3x1x4 chain (the request's own
    spec_config): drafts are accepted, and every streamed chunk's counts add up (the identity is exact
    before the last verify), so a server that accepts nothing or miscounts fails."""
    spec = SpecConfig.parse("3x1x4")
    accepted = 0
    for prompt in SPEC_PROMPTS:
        chunks = _stream(server, {"text": prompt, "spec_config": "3x1x4",
                                  "sampling_params": {"max_new_tokens": 3 * MAX_NEW, "temperature": 0}})
        for c in chunks:
            _check_counts(c["meta_info"], finished=c["meta_info"]["finish_reason"] is not None, max_steps=spec.steps)
        meta = chunks[-1]["meta_info"]
        assert meta["spec_config"] == spec.label() and meta["spec_share_speculating"] == 1.0, meta
        accepted += meta["spec_accepted_drafts"]
    assert accepted > 0, "no draft of the default head was accepted on any prompt"


@pytest.mark.slow
def test_plain_request_counts_one_token_per_verify(server):
    """A request held at plain decoding (spec_config 0) accepts no drafts: one token per verify, exactly."""
    res = _generate(server, text="The capital of France is", spec_config="0")
    _check_result(res)
    meta = res["meta_info"]
    assert meta["spec_accepted_drafts"] == 0 and meta["spec_share_speculating"] == 0.0, meta
    assert meta["completion_tokens"] == meta["spec_verify_ct"] + 1 and meta["spec_accept_length"] == 1.0, meta


@pytest.mark.slow
def test_input_ids_and_stop_string(server):
    first = _generate(server, text="Count: one, two, three,")
    ids = first["output_ids"]
    res = _generate(server, input_ids=ids)
    _check_result(res)
    assert res["meta_info"]["prompt_tokens"] == len(ids)
    # Greedy decoding repeats itself, so a stop string taken from the middle of the output must cut there.
    text = first["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip(f"no usable stop string in {text!r}")
    cut = _generate(server, text="Count: one, two, three,",
                    sampling_params={"max_new_tokens": MAX_NEW, "temperature": 0, "stop": [stop]})
    assert cut["text"] == text[:text.index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


@pytest.mark.slow
def test_info_endpoints(server):
    info = requests.get(server.url + "/get_model_info", timeout=30).json()
    assert info["is_generation"] is True and info["model_path"]
    assert isinstance(requests.get(server.url + "/get_server_info", timeout=30).json(), dict)
    assert requests.get(server.url + "/server_info", timeout=30).status_code == 200
    assert requests.post(server.url + "/flush_cache", timeout=30).status_code == 200
    assert requests.get(server.url + "/health_generate", timeout=300).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("body, needle", [
    ("{not json", "malformed JSON"),
    ({"sampling_params": {"max_new_tokens": 4}}, "text"),
    ({"text": ""}, "empty"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 4, "tempurature": 0}}, "tempurature"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 10 ** 6}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 4, "temperature": -1}}, "temperature"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 4, "regex": "[0-9]+"}}, "regex"),
    ({"text": "hi", "stream": True, "sampling_params": {"max_new_tokens": 4, "temperature": -1}}, "temperature"),
])
def test_bad_input_is_400_and_server_survives(server, body, needle):
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(server.url + "/generate", data=data, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert requests.get(server.url + "/health", timeout=30).status_code == 200


@pytest.mark.slow
def test_sglang_frontend_program(server):
    sgl = pytest.importorskip("sglang", reason="the SGLang frontend language is not installed")

    @sgl.function
    def answer(s, question):
        s += "Question: " + question + "\nAnswer:"
        s += sgl.gen("answer", max_tokens=MAX_NEW, temperature=0)

    state = answer.run(question="What is 2 + 2?", backend=sgl.RuntimeEndpoint(server.url))
    assert isinstance(state["answer"], str), state.error()
    meta = state.get_meta_info("answer")
    assert meta["completion_tokens"] >= 1 and "spec_accept_length" in meta


@pytest.mark.slow
def test_sigterm_stops_server_and_scheduler(server):
    children = _children(server.proc.pid)
    assert children, "the scheduler process should be a child of the server"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()[-2000:]
    time.sleep(0.5)
    assert not [pid for pid in children if _running(pid)]
