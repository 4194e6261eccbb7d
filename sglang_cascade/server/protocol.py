"""What crosses the wire: SGLang `/generate` bodies, scheduler messages, incremental text.

The HTTP front end and the scheduler process exchange the pickled dataclasses below over ZeroMQ;
the request parser turns an SGLang native-API body into engine requests, and names the field and
the fix whenever it refuses one (the server answers those with HTTP 400).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from sglang_cascade.controller import SpecConfig
from sglang_cascade.engine import GenerationRequest, SamplingParams


class BadRequest(ValueError):
    """A client error, answered with HTTP 400 and this message; `param` names the field at fault
    (OpenAI's error shape has a slot for it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---- scheduler messages (front end -> scheduler) ----

@dataclass
class Submit:
    """Requests of one HTTP call: validated together, so a batch is accepted or refused whole."""
    reqs: list[GenerationRequest]


@dataclass
class Abort:
    rids: list[str]


@dataclass
class Shutdown:
    pass


# ---- scheduler messages (scheduler -> front end); step results travel as list[StepOutput] ----

@dataclass
class Submitted:
    """Answer to Submit: error is None when every request was added to the engine."""
    rids: list[str]
    error: str | None = None
    bad_request: bool = True  # False: the engine failed, not the request (HTTP 500)


@dataclass
class Failed:
    """The engine raised while running these requests; they were dropped."""
    rids: list[str]
    error: str


# ---- SGLang /generate bodies ----

# Sampling parameters we implement, with SGLang's defaults (not the engine's: temperature 1.0).
SAMPLING_DEFAULTS = {
    "max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "stop": None,
    "stop_token_ids": None, "ignore_eos": False, "sampling_seed": None, "no_stop_trim": False,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "stream_interval": None,
}
# SGLang sampling parameters we accept only at their neutral value, with why not otherwise.
_CONSTRAINED = "no constrained decoding, so neither regex= nor sgl.gen(dtype=...)"
SAMPLING_NEUTRAL = {
    "min_new_tokens": (0, "no minimum length"), "n": (1, "one sample per prompt"),
    "beam_width": (1, "no beam search"), "min_p": (0.0, "no min-p sampling"),
    "frequency_penalty": (0.0, "no penalties"), "presence_penalty": (0.0, "no penalties"),
    "repetition_penalty": (1.0, "no penalties"), "logit_bias": (None, "no logit bias"),
    "regex": (None, _CONSTRAINED), "json_schema": (None, _CONSTRAINED), "ebnf": (None, _CONSTRAINED),
    "structural_tag": (None, _CONSTRAINED), "stop_regex": (None, "stop strings only, no stop regex"),
    "custom_params": (None, "no custom logit processors"), "watermark": (None, "no watermarking"),
}
# Top-level fields we implement; any other must be absent or off (null / false / empty).
REQUEST_FIELDS = {"text", "input_ids", "sampling_params", "stream", "rid", "spec_config"}
# Top-level fields that only qualify others or only affect logging: ignored whatever their value.
REQUEST_IGNORED = {"log_metrics", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"}


@dataclass
class Item:
    """One prompt of a /generate call, with what the front end itself must apply to its output."""
    req: GenerationRequest
    stop: list[str] = field(default_factory=list)
    no_stop_trim: bool = False
    skip_special_tokens: bool = True


def _is_off(value, neutral=None) -> bool:
    return value is None or value is False or value == neutral or value in ("", [], {}, ())


def _check_type(name: str, value, kind: type | tuple, what: str):
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise BadRequest(f"sampling_params.{name} must be {what}, got {value!r}")


def parse_sampling(sp: dict | None) -> tuple[SamplingParams, dict]:
    """SGLang sampling_params -> (engine SamplingParams, front-end options: stop strings, trimming).

    Range checks (negative temperature, max_new_tokens beyond the context) are the engine's
    `validate`; here only names and types, so that the message points at the field.
    """
    sp = {} if sp is None else sp
    if not isinstance(sp, dict):
        raise BadRequest(f"sampling_params must be a JSON object (or a list of them), got {sp!r}")
    for name, value in sp.items():
        if name in SAMPLING_NEUTRAL and not _is_off(value, SAMPLING_NEUTRAL[name][0]):
            neutral, why = SAMPLING_NEUTRAL[name]
            raise BadRequest(f"sampling_params.{name}={value!r} is not supported by sglang-cascade ({why}); "
                             f"remove it or set it to {json.dumps(neutral)}")
        if name not in SAMPLING_DEFAULTS and name not in SAMPLING_NEUTRAL:
            raise BadRequest(f"unknown sampling param {name!r}; supported: {', '.join(SAMPLING_DEFAULTS)}")
    p = {k: (SAMPLING_DEFAULTS[k] if sp.get(k) is None else sp[k]) for k in SAMPLING_DEFAULTS}
    _check_type("max_new_tokens", p["max_new_tokens"], int, "an integer")
    _check_type("top_k", p["top_k"], int, "an integer")
    for name in ("temperature", "top_p"):
        _check_type(name, p[name], (int, float), "a number")
    for name in ("ignore_eos", "no_stop_trim", "skip_special_tokens", "spaces_between_special_tokens"):
        _check_type(name, p[name], bool, "true or false")
    if p["sampling_seed"] is not None:
        _check_type("sampling_seed", p["sampling_seed"], int, "an integer")
    stop = p["stop"] or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"sampling_params.stop must be a string or a list of non-empty strings, got {p['stop']!r}")
    stop_ids = p["stop_token_ids"] or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise BadRequest(f"sampling_params.stop_token_ids must be a list of token ids, got {p['stop_token_ids']!r}")
    sampling = SamplingParams(
        max_new_tokens=p["max_new_tokens"], temperature=float(p["temperature"]), top_p=float(p["top_p"]),
        top_k=p["top_k"], stop_token_ids=stop_ids or None, ignore_eos=p["ignore_eos"], seed=p["sampling_seed"])
    return sampling, {"stop": stop, "no_stop_trim": p["no_stop_trim"], "skip_special_tokens": p["skip_special_tokens"]}


def parse_generate(body, tokenizer) -> tuple[list[Item], bool, bool]:
    """An SGLang /generate body -> (items, is_batch, stream). `text` is tokenised raw (no chat template)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object such as "
                         '{"text": "Hello", "sampling_params": {"max_new_tokens": 16}}')
    for name, value in body.items():
        if name not in REQUEST_FIELDS and name not in REQUEST_IGNORED and not _is_off(value, 0):
            raise BadRequest(f"request field {name!r}={value!r} is not supported by sglang-cascade; it implements "
                             f"{', '.join(sorted(REQUEST_FIELDS))} (other SGLang fields must be absent, null or false)")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise BadRequest('give exactly one of "text" (a string or a list of strings) '
                         'or "input_ids" (a list of token ids or a list of such lists)')
    if text is not None:
        is_batch = isinstance(text, list)
        texts = text if is_batch else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest('"text" must be a string or a non-empty list of strings')
        prompts = [tokenizer.encode(t) if t else [] for t in texts]
    else:
        is_batch = isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list)
        prompts = input_ids if is_batch else [input_ids]
        if not all(
                isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompts):
            raise BadRequest('"input_ids" must be a list of token ids (integers) or a list of such lists')
        bad = [t for p in prompts for t in p if not 0 <= t < len(tokenizer)]
        if bad:
            raise BadRequest(f'"input_ids" has token id {bad[0]} outside the vocabulary [0, {len(tokenizer)})')
    for i, p in enumerate(prompts):
        if not p:
            raise BadRequest(f"prompt {i} is empty; send at least one token of text or input_ids")
    n = len(prompts)
    sps = body.get("sampling_params")
    sps = sps if isinstance(sps, list) else [sps] * n
    rids = body.get("rid")
    rids = [None] * n if rids is None else rids if is_batch else [rids]
    if len(sps) != n or not isinstance(rids, list) or len(rids) != n:
        raise BadRequest(f"sampling_params and rid lists must have one entry per prompt ({n})")
    spec = None
    if body.get("spec_config") is not None:
        try:
            spec = SpecConfig.parse(str(body["spec_config"]))
        except ValueError as e:
            raise BadRequest(f"spec_config: {e}") from None
    items = []
    for p, sp, rid in zip(prompts, sps, rids):
        sampling, opts = parse_sampling(sp)
        rid = str(rid) if rid is not None else uuid.uuid4().hex
        items.append(Item(GenerationRequest(rid=rid, input_ids=list(p), sampling=sampling, spec=spec), **opts))
    if len({it.req.rid for it in items}) != n:
        raise BadRequest("rid values must be distinct within a batch")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest(f'"stream" must be true or false, got {stream!r}')
    return items, is_batch, stream


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, only ever appending.

    Decodes a short window (from the last confirmed boundary) rather than the whole output, and
    holds back text that ends in an incomplete UTF-8 character, as SGLang's detokenizer does.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # ids[_prefix:_read] is context, ids[_read:] not yet in text

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(context) and not window.endswith("\ufffd"):
            self.text += window[len(context):]
            self._prefix, self._read = self._read, len(self.ids)
        return self.text

    def flush(self) -> str:
        """At the end of generation: emit whatever is held back, incomplete characters included."""
        context = self._decode(self.ids[self._prefix:self._read])
        self.text += self._decode(self.ids[self._prefix:])[len(context):]
        self._prefix = self._read = len(self.ids)
        return self.text
