"""The OpenAI-compatible endpoints (/v1/chat/completions, /v1/completions, /v1/models).

The real server is started once (module fixture, the embedded default model as in test_server.py; it
ships a chat template) and driven as OpenAI clients drive SGLang's: raw HTTP and the `openai`
package. Greedy chat must equal /generate on the same templated prompt, token for token: the OpenAI
layer is only another envelope around the one generation path.
"""

from __future__ import annotations

import json

import pytest
import requests
from engine_server import CharTokenizer, engine_server

from sglang_cascade.engine import StepOutput
from sglang_cascade.server.http_server import Generation
from sglang_cascade.server.openai_api import Answer, parse_completion

MAX_NEW = 16
CONTEXT = 512
SERVED = "cascade-test"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
ERROR_KEYS = {"message", "type", "param", "code"}


# ---- streaming assembly (no model) ----

def _feed(stop, pieces, chat=True):
    """Stream `pieces` (the last one finishing by length) through Answer; the deltas and the final text."""
    req = parse_completion({"prompt": "p", "stop": stop, "max_tokens": 50}, CharTokenizer(), "m")
    g, answer, deltas = Generation(req.item, CharTokenizer()), Answer(req, chat=chat), []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        g.update(StepOutput("r", [ord(c) for c in piece], last, {"type": "length"} if last else None, {}))
        for c in answer.chunks(0, g):
            for choice in c["choices"]:
                deltas.append(choice["delta"].get("content", "") if chat else choice["text"])
        if g.finished:
            break
    return deltas, g


def test_stream_holds_back_what_may_become_a_stop_string():
    """'lo' could start the stop string 'lo w': sent early, it could not be taken back once cut."""
    deltas, g = _feed("lo w", ["hel", "lo", " world"])
    assert g.text == "hel" and "".join(deltas) == "hel" and "lo" not in deltas
    deltas, g = _feed(["lo w"], ["hel", "lo", " there"])   # not a stop after all: sent in the end
    assert g.text == "hello there" and "".join(deltas) == g.text
    deltas, g = _feed(None, ["ab", "cd"], chat=False)
    assert deltas == ["ab", "cd", ""] and g.text == "abcd"


# ---- the real server ----

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoTokenizer

    log = tmp_path_factory.mktemp("server") / "server.log"
    with engine_server(log, "--context-length", str(CONTEXT), "--served-model-name", SERVED) as srv:
        srv.model_path = requests.get(srv.url + "/get_model_info", timeout=30).json()["model_path"]
        srv.tokenizer = AutoTokenizer.from_pretrained(srv.model_path)
        yield srv


def _post(server, path, body):
    r = requests.post(server.url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _events(server, path, body) -> list[dict]:
    """A stream's events, checking the SSE framing and that [DONE] comes last."""
    r = requests.post(server.url + path, json=body | {"stream": True}, stream=True, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/event-stream")
    lines = [ln.decode() for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def _chat(server, **extra):
    return _post(server, "/v1/chat/completions",
                 {"model": SERVED, "messages": CHAT, "max_tokens": MAX_NEW, "temperature": 0} | extra)


def _check_spec(sglext, usage):
    """The request's own speculative figures, as /generate's meta_info has them."""
    spec = sglext["spec_tokens_details"]
    assert spec["spec_verify_ct"] >= 1 and isinstance(spec["cascade"], dict), spec
    assert spec["spec_accept_length"] == pytest.approx((usage["completion_tokens"] - 1) / spec["spec_verify_ct"])


def _templated(server, messages=CHAT) -> str:
    return server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
def test_chat_equals_generate_on_the_templated_prompt(server):
    res = _chat(server, return_meta_info=True, return_output_ids_in_sglext=True)
    ref = _post(server, "/generate", {"text": _templated(server),
                                      "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}})
    meta = ref["meta_info"]
    assert res["object"] == "chat.completion" and res["model"] == SERVED and res["id"]
    choice = res["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == ref["text"]
    assert choice["finish_reason"] == meta["finish_reason"]["type"]
    assert res["usage"] == {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
                            "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"]}
    assert choice["meta_info"]["completion_tokens"] == meta["completion_tokens"]   # SGLang's return_meta_info
    assert res["sglext"]["output_ids"] == [ref["output_ids"]]   # SGLang's return_output_ids_in_sglext
    _check_spec(res["sglext"], res["usage"])
    assert "output_ids" not in _chat(server)["sglext"]   # only when asked


@pytest.mark.slow
def test_chat_stream_adds_up_to_the_non_stream_answer(server):
    full = _chat(server)
    events = _events(server, "/v1/chat/completions", {"model": SERVED, "messages": CHAT, "max_tokens": MAX_NEW,
                                                      "temperature": 0, "stream_options": {"include_usage": True},
                                                      "return_output_ids_in_sglext": True})
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        full["choices"][0]["finish_reason"]]
    _check_spec(chunks[-1]["sglext"], full["usage"])
    assert len(chunks[-1]["sglext"]["output_ids"][0]) == full["usage"]["completion_tokens"]   # all in the last chunk
    plain = _events(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": MAX_NEW, "temperature": 0})
    assert all(e["choices"] for e in plain), "a usage chunk without include_usage"


@pytest.mark.slow
def test_stop_strings_cut_before_the_stop(server):
    text = _chat(server)["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if len(text) < 4 or not stop.strip():
        pytest.skip(f"no usable stop string in {text!r}")
    cut = text[:text.index(stop)]
    for form in ([stop, "never appears"], stop):
        res = _chat(server, stop=form)
        assert res["choices"][0]["message"]["content"] == cut
        assert res["choices"][0]["finish_reason"] == "stop" and res["choices"][0]["matched_stop"] == stop
    events = _events(server, "/v1/chat/completions",
                     {"messages": CHAT, "max_tokens": MAX_NEW, "temperature": 0, "stop": stop})
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == cut
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_completions_string_ids_and_stream(server):
    ref = _post(server, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}})
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0}
    res = _post(server, "/v1/completions", body)
    assert res["object"] == "text_completion" and res["choices"][0]["text"] == ref["text"]
    assert res["usage"]["prompt_tokens"] == ref["meta_info"]["prompt_tokens"]
    assert res["usage"]["completion_tokens"] == ref["meta_info"]["completion_tokens"]
    _check_spec(res["sglext"], res["usage"])
    by_ids = _post(server, "/v1/completions", body | {"prompt": server.tokenizer.encode(PROMPT)})
    assert by_ids["choices"][0]["text"] == ref["text"]
    events = _events(server, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    *chunks, usage = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == res["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == res["usage"]


@pytest.mark.slow
def test_models_lists_the_served_model(server):
    r = requests.get(server.url + "/v1/models", timeout=30)
    assert r.status_code == 200
    listing = r.json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [SERVED]
    card = listing["data"][0]
    assert card["object"] == "model" and card["root"] == server.model_path and card["max_model_len"] == CONTEXT


TEXT_PART = [{"type": "text", "text": "Hi"}]
IMAGE_PART = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]


@pytest.mark.slow
@pytest.mark.parametrize("path, body, param, needle", [
    ("/v1/chat/completions", "{not json", None, "malformed JSON"),
    ("/v1/chat/completions", {"model": SERVED}, "messages", "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages", "non-empty"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 2}, "n", "n=2"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools", "tool"),
    ("/v1/chat/completions", {"messages": CHAT, "functions": [{"name": "f"}]}, "functions", "function"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format",
     "JSON"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True}, "logprobs", "log probabilities"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens", "positive"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -3}, "max_completion_tokens", "positive"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT_PART + IMAGE_PART}]},
     "messages[0].content", "image_url"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role", "wizard"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}, "messages[0]",
     "tool"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, "temperature", "number"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True, "return_meta_info": True}, "return_meta_info",
     "streaming"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "temperature": -1}, None, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "temperature": -1, "stream": True}, None,
     "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10 * CONTEXT}, None, "max_new_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "guided_choice": ["a"]}, "guided_choice", "guided_choice"),
    ("/v1/completions", {"prompt": PROMPT, "n": 3}, "n", "n=3"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}, "logprobs", "log probabilities"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True}, "echo", "echo"),
    ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ("/v1/completions", {"max_tokens": 4}, "prompt", "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens", "positive"),
    ("/v1/completions", {"prompt": PROMPT, "stop_token_ids": ["x"]}, "stop_token_ids", "token ids"),
])
def test_unsupported_or_malformed_is_an_openai_400(server, path, body, param, needle):
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "invalid_request_error", error
    assert error["param"] == param and needle in error["message"], error
    assert requests.get(server.url + "/v1/models", timeout=30).status_code == 200   # still serving


@pytest.mark.slow
def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    ref = _chat(server)["choices"][0]["message"]["content"]
    res = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=MAX_NEW, temperature=0)
    assert res.choices[0].message.content == ref and res.usage.total_tokens > res.usage.completion_tokens > 0
    assert res.model_extra["sglext"]["spec_tokens_details"]["spec_verify_ct"] >= 1
    stream = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=MAX_NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == res.usage.completion_tokens
    text = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0).choices[0].text
    assert text == _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_NEW,
                                                     "temperature": 0})["choices"][0]["text"]
    assert [m.id for m in client.models.list()] == [SERVED]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED, messages=CHAT, n=2)
    assert "n=2" in e.value.message
