"""OpenAI-compatible endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

A thin layer over the native path: each request becomes one protocol `Item` and runs through
`CascadeHTTPServer.run`, exactly as /generate does; only the request parsing and the response shapes
differ. The shapes are those of SGLang's OpenAI layer (sglang/srt/entrypoints/openai), so one client
drives either server. The request's speculative figures (what /generate reports in meta_info:
spec_verify_ct, spec_accept_length, the cascade stats, ...) travel in SGLang's response-level
extension field, `sglext.spec_tokens_details`: always (SGLang sends it only when asked with
return_spec_tokens_details), in the final chunk when streaming. `return_meta_info: true` adds the whole
meta_info to the chat choice, as in SGLang; `return_output_ids_in_sglext: true` adds the answer's token
ids as `sglext.output_ids` (one list per choice; streamed: all of them in the final chunk).

Whatever the engine cannot do (n > 1, tools, logprobs, JSON mode, non-text content, ...) is a 400
naming the field, never a silently different answer.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from jinja2 import TemplateError

from sglang_cascade.controller import SpecConfig
from sglang_cascade.engine import GenerationRequest
from sglang_cascade.server.protocol import BadRequest, Item, parse_sampling

# OpenAI / SGLang request field -> the sampling_params name protocol.parse_sampling checks and applies.
SAMPLING_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "sampling_seed", "stop": "stop",
    "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "no_stop_trim": "no_stop_trim",
    "skip_special_tokens": "skip_special_tokens", "spaces_between_special_tokens": "spaces_between_special_tokens",
}
COMMON_FIELDS = {"model", "max_tokens", "stream", "stream_options", "rid", "spec_config",
                 "return_output_ids_in_sglext", *SAMPLING_FIELDS}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "return_meta_info", "chat_template_kwargs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
# Accepted whatever their value: bookkeeping, or asking for what we always send.
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "return_spec_tokens_details"}
# Fields accepted only absent, null, false, empty or at one of these values; with why not otherwise.
_NO_TOOLS = "no tool or function calling"
_CONSTRAINED = "no constrained decoding: no JSON mode, JSON schema, regex or grammar"
UNSUPPORTED = {
    "n": ((1,), "one choice per request; send n requests instead"),
    "best_of": ((1,), "one choice per request"),
    "logprobs": ((), "no log probabilities"),
    "top_logprobs": ((0,), "no log probabilities"),
    "echo": ((), "no echo of the prompt"),
    "suffix": ((), "no insertion (suffix)"),
    "tools": ((), _NO_TOOLS),
    "tool_choice": (("none", "auto"), _NO_TOOLS),
    "functions": ((), _NO_TOOLS),
    "function_call": (("none", "auto"), _NO_TOOLS),
    "response_format": (({"type": "text"},), _CONSTRAINED),
    "regex": ((), _CONSTRAINED), "json_schema": ((), _CONSTRAINED), "ebnf": ((), _CONSTRAINED),
    "stop_regex": ((), "stop strings only, no stop regex"),
    "frequency_penalty": ((0,), "no penalties"), "presence_penalty": ((0,), "no penalties"),
    "repetition_penalty": ((1,), "no penalties"), "logit_bias": ((), "no logit bias"),
    "min_p": ((0,), "no min-p sampling"), "min_tokens": ((0,), "no minimum length"),
    "continue_final_message": ((), "the assistant's answer always starts a new message"),
    "return_hidden_states": ((), "no hidden states"), "lora_path": ((), "no LoRA adapters"),
}
ROLES = ("system", "developer", "user", "assistant")
COMPLETION_MAX_TOKENS = 16  # OpenAI's and SGLang's default for /v1/completions; chat runs to the context's end
SPEC_KEYS = ("cascade", "adaptive")  # besides spec_*: the speculation policy's per-request stats


def _off(value, allowed=()) -> bool:
    return (value is None or value is False or (isinstance(value, (str, list, dict)) and not value)
            or any(value == a for a in allowed))


@dataclass
class Request:
    """One parsed OpenAI request: the engine item plus what shapes the answer."""
    item: Item
    model: str
    stream: bool
    include_usage: bool
    return_meta_info: bool = False
    return_output_ids: bool = False


def _check_fields(body, allowed: set[str], example: str):
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object such as {example}")
    for name, value in body.items():
        if name in UNSUPPORTED:
            neutral, why = UNSUPPORTED[name]
            if not _off(value, neutral):
                fix = f" or set it to {json.dumps(neutral[0])}" if neutral else ""
                raise BadRequest(f"{name}={json.dumps(value)} is not supported by sglang-cascade ({why}); "
                                 f"remove it{fix}", name)
        elif name not in allowed and name not in IGNORED_FIELDS and not _off(value):
            raise BadRequest(f"{name!r} is not supported by sglang-cascade's OpenAI API; it implements "
                             f"{', '.join(sorted(allowed))}", name)


def _max_tokens(body, names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest(f"{name} must be a positive integer, got {value!r}", name)
        return value
    return default


def _request(body, input_ids: list[int], max_new: int, model_name: str) -> Request:
    """The fields both endpoints share -> a Request; sampling checks are protocol.parse_sampling's."""
    sp = {sp_name: body.get(name) for name, sp_name in SAMPLING_FIELDS.items()}
    sp["max_new_tokens"] = max_new
    try:
        sampling, opts = parse_sampling(sp)
    except BadRequest as e:   # its messages name sampling_params.<name>: name the request's field instead
        msg = str(e).replace("sampling_params.", "").replace("sampling_seed", "seed")
        raise BadRequest(msg, next((n for n in SAMPLING_FIELDS if msg.startswith(n + " ")), None)) from None
    spec = None
    if body.get("spec_config") is not None:
        try:
            spec = SpecConfig.parse(str(body["spec_config"]))
        except ValueError as e:
            raise BadRequest(f"spec_config: {e}", "spec_config") from None
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f'"rid" must be a string, got {rid!r}', "rid")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest(f'"stream" must be true or false, got {stream!r}', "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest(f'"stream_options" must be an object such as {{"include_usage": true}}, got {options!r}',
                         "stream_options")
    model = body.get("model")
    req = GenerationRequest(rid=rid or uuid.uuid4().hex, input_ids=list(input_ids), sampling=sampling, spec=spec)
    return Request(Item(req, **opts), model if isinstance(model, str) and model else model_name, stream,
                   bool(options.get("include_usage")), return_output_ids=bool(body.get("return_output_ids_in_sglext")))


def _text(content, where: str) -> str:
    """Message content -> text: a string, or text parts joined with spaces (as SGLang does)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of text parts, got {content!r}", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f"{where}[{j}] is a {kind or type(part).__name__!r} part; sglang-cascade serves a "
                             'text-only model: send {"type": "text", "text": "..."} parts or a string', where)
        texts.append(part["text"])
    return " ".join(texts)


def parse_messages(messages) -> list[dict]:
    """OpenAI messages -> what an HF chat template takes: {role, content} with text content."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest('"messages" must be a non-empty list such as [{"role": "user", "content": "Hello"}]',
                         "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f'{where} must be an object such as {{"role": "user", "content": "Hello"}}', where)
        role = m.get("role")
        if role in ("tool", "function") or not _off(m.get("tool_calls")) or not _off(m.get("function_call")):
            raise BadRequest(f"{where}: tool and function messages are not supported by sglang-cascade "
                             f"({_NO_TOOLS})", where)
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
        content = m.get("content")
        content = "" if content is None and role == "assistant" else _text(content, f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def chat_prompt(tokenizer, messages: list[dict], kwargs) -> list[int]:
    """Rendered with the model's chat template, then tokenised without special tokens (the template
    writes them), which is what apply_chat_template(tokenize=True) does."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("the served model has no chat template; use /v1/completions with a prompt you "
                         "format yourself", "messages")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise BadRequest(f'"chat_template_kwargs" must be an object, got {kwargs!r}', "chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **(kwargs or {}))
    except (TemplateError, ValueError, TypeError) as e:
        raise BadRequest(f"the model's chat template refused these messages: {e}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def parse_chat(body, tokenizer, model_name: str, context_length: int) -> Request:
    _check_fields(body, CHAT_FIELDS, '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}')
    ids = chat_prompt(tokenizer, parse_messages(body.get("messages")), body.get("chat_template_kwargs"))
    max_new = _max_tokens(body, ("max_completion_tokens", "max_tokens"), max(1, context_length - len(ids)))
    req = _request(body, ids, max_new, model_name)
    req.return_meta_info = bool(body.get("return_meta_info"))
    if req.return_meta_info and req.stream:
        raise BadRequest("return_meta_info is not supported with streaming (as in SGLang): set stream to false; "
                         "the final chunk carries the speculative figures in sglext", "return_meta_info")
    return req


def parse_completion(body, tokenizer, model_name: str) -> Request:
    _check_fields(body, COMPLETION_FIELDS, '{"prompt": "Hello", "max_tokens": 16}')
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]   # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt) if prompt else []
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < len(tokenizer)]
        if bad:
            raise BadRequest(f'"prompt" has token id {bad[0]} outside the vocabulary [0, {len(tokenizer)})', "prompt")
        ids = prompt
    else:
        raise BadRequest('"prompt" must be a string or a list of token ids (one prompt per request)', "prompt")
    if not ids:
        raise BadRequest('"prompt" is empty; send at least one token', "prompt")
    return _request(body, ids, _max_tokens(body, ("max_tokens",), COMPLETION_MAX_TOKENS), model_name)


# ---- responses ----

def spec_figures(meta: dict) -> dict:
    """The speculative part of /generate's meta_info: spec_* and the policy's per-request stats."""
    return {k: v for k, v in meta.items() if k.startswith("spec_") or k in SPEC_KEYS}


def _finish(g) -> dict:
    reason = g.finish_reason or {}
    return {"finish_reason": reason.get("type"), "matched_stop": reason.get("matched")}


def _usage(g) -> dict:
    prompt, completion = len(g.item.req.input_ids), len(g.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def visible_text(g) -> str:
    """What a stream may send so far: the text less any tail that could still grow into a stop string
    (it would then be cut away), so that the deltas add up to the final text."""
    text = g.text
    if g.finished or not g.item.stop:
        return text
    for k in range(min(len(text), max(map(len, g.item.stop)) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in g.item.stop):
            return text[:-k]
    return text


class Answer:
    """Response and stream-chunk shapes of one request; `chat` picks chat.completion or text_completion."""

    def __init__(self, req: Request, chat: bool):
        self.req, self.chat = req, chat
        self.created = int(time.time())
        self.sent = ""
        self.started = False

    def _head(self, obj: str) -> dict:
        return {"id": self.req.item.req.rid, "object": obj, "created": self.created, "model": self.req.model}

    def response(self, g) -> dict:
        meta = g.result()["meta_info"]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": g.text, "reasoning_content": None,
                                              "tool_calls": None},
                      "logprobs": None, **_finish(g)}
            if self.req.return_meta_info:
                choice["meta_info"] = meta
        else:
            choice = {"index": 0, "text": g.text, "logprobs": None, **_finish(g)}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": _usage(g), "sglext": self._sglext(g, meta)}

    def _sglext(self, g, meta: dict) -> dict:
        ext = {"spec_tokens_details": spec_figures(meta)}
        if self.req.return_output_ids:
            ext["output_ids"] = [list(g.output_ids)]
        return ext

    def _chunk(self, delta: str | dict, finish: dict | None = None) -> dict:
        choice = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta}
        choice |= {"logprobs": None, "finish_reason": None, "matched_stop": None} | (finish or {})
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [choice], "usage": None}

    def chunks(self, _index: int, g) -> list[dict]:
        """The SSE events for one update of the generation, as SGLang streams them: (chat) a first
        chunk with the role, text deltas, a final chunk with finish_reason (and sglext), then, when
        stream_options.include_usage, a usage chunk with no choices."""
        out = []
        if self.chat and not self.started:
            out.append(self._chunk({"role": "assistant", "content": ""}))
        self.started = True
        text = visible_text(g)
        if len(text) > len(self.sent):
            delta = text[len(self.sent):]
            out.append(self._chunk({"content": delta} if self.chat else delta))
            self.sent = text
        if g.finished:
            final = self._chunk({} if self.chat else "", _finish(g))
            final["sglext"] = self._sglext(g, g.result()["meta_info"])
            out.append(final)
            if self.req.include_usage:
                out.append({**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                            "choices": [], "usage": _usage(g)})
        return out


# ---- endpoints (called with the http_server.Handler of the call) ----

def _serve(handler, req: Request, chat: bool):
    answer = Answer(req, chat)
    if req.stream:
        return handler.sse([req.item], answer.chunks)
    g = handler.server.run([req.item])[0]
    handler._json(200, answer.response(g))


def chat_completions(handler):
    s = handler.server
    body = handler._body('{"messages": [{"role": "user", "content": "Hello"}]}')
    _serve(handler, parse_chat(body, s.tokenizer, s.served_model_name, s.server_info["context_length"]), chat=True)


def completions(handler):
    s = handler.server
    body = handler._body('{"prompt": "Hello", "max_tokens": 16}')
    _serve(handler, parse_completion(body, s.tokenizer, s.served_model_name), chat=False)


def models(handler):
    s = handler.server
    card = {"id": s.served_model_name, "object": "model", "created": s.created, "owned_by": "sglang-cascade",
            "root": s.model_info.get("model_path"), "parent": None, "max_model_len": s.server_info["context_length"]}
    handler._json(200, {"object": "list", "data": [card]})
