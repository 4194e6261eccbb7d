"""SGLangAdaptivePolicy: SGLang's own adaptive speculation policy, as a baseline for Cascade.

Why: the evals compare Cascade with what SGLang ships. Running SGLang itself would change the
engine as well as the policy (kernels, batching, CUDA graphs), so this module re-implements SGLang's
batch-level adaptive policy behind the same interface as CascadeController (add_request,
finish_request, decide, observe, request_stats, summary) and the portable engine runs it as
`--mode adaptive`: same engine, same drafter, only the policy differs.

What it mirrors: `sglang/srt/speculative/adaptive_spec_params.py` of SGLang 0.5.23
(`AdaptiveStepSlot`, `AdaptiveSpeculativeParams`, `DEFAULT_ADAPTIVE_CONFIG`), the policy behind
`--speculative-adaptive` / `--speculative-adaptive-config`. Written from its behaviour, not copied:

* One slot per batch-size key of the config ("1", "8", "32", "64" by default), each with its own
  candidate steps, EMA and current steps. A running batch of n requests uses the slot with the
  largest key <= n (the smallest key when n is below all keys). SGLang first pads n up to a
  CUDA-graph batch size; this engine has no CUDA graphs, so there is no padding.
* Every request of the batch runs the slot's current steps as a chain (topk 1, steps + 1 draft
  tokens; steps 0 = plain decoding).
* After each verify (SGLang's on_verify_complete) the slot of that batch size takes the requests'
  accepted draft counts: while it speculates, its EMA of accepted drafts per request moves by
  ema_alpha toward the batch mean; the first warmup_batches batches only count, then every
  update_interval-th batch recomputes the steps:
    - at steps 0 (no drafts, so no acceptance signal) it probes the next candidate up, restarting
      the EMA at that step's neutral value (steps - 1) if it is still negative;
    - otherwise it steps down while EMA <= threshold of the candidate below (0.5 when that is 0,
      else candidate - 0.5) + down_hysteresis, and if it did not step down, steps up while
      EMA > current - 0.5 + up_hysteresis;
    - with ceiling_coeff > 0, a target that is not a step up is capped at
      max(1, ceil(EMA * ceiling_coeff)) (rounded down to a candidate).
* Knobs at the top level of the config apply to every slot; a slot's own keys override them.
  Defaults: ema_alpha 0.2, update_interval 5, warmup_batches 10, up_hysteresis 0.0,
  down_hysteresis -0.25, ceiling_coeff 0. The initial steps must be one of the candidates (SGLang
  refuses --speculative-num-steps otherwise); a slot whose candidates lack it starts at its middle
  candidate.

Differences, on purpose: the config is checked more strictly than SGLang does (unknown keys, knob
types and ranges are refused, naming the key and value, instead of being ignored or failing later),
and a request that runs a per-request configuration other than the one decided (the engine's
GenerationRequest.spec override) is left out of its slot's update, since its acceptance does not
measure the slot's steps. Standard library only, like the rest of the controller package.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import re
from collections import deque

from .types import IterationRecord, SpecConfig

SGLANG_SOURCE = "sglang/srt/speculative/adaptive_spec_params.py (SGLang 0.5.23)"

# SGLang's DEFAULT_ADAPTIVE_CONFIG: batch-size key -> slot settings.
DEFAULT_ADAPTIVE_CONFIG: dict[str, dict] = {
    "1": {"candidate_steps": [1, 3, 5, 7], "up_hysteresis": 0.0, "down_hysteresis": -0.25, "ceiling_coeff": 0},
    "8": {"candidate_steps": [0, 1, 3], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
    "32": {"candidate_steps": [0, 1], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
    "64": {"candidate_steps": [0], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
}

# Knob -> (default, check, what a good value is). Valid at the top level and inside a slot.
_KNOBS = {
    "ema_alpha": (0.2, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "update_interval": (5, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "warmup_batches": (10, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "up_hysteresis": (0.0, lambda v: _is_number(v) and math.isfinite(v), "a finite number"),
    "down_hysteresis": (-0.25, lambda v: _is_number(v) and math.isfinite(v), "a finite number"),
    "ceiling_coeff": (0, lambda v: _is_number(v) and math.isfinite(v) and v >= 0,
                      "a finite number >= 0 (0 = no ceiling)"),
}
_BS_KEY = re.compile(r"[0-9]+")
_HISTORY = 64   # steps changes kept per request for request_stats


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_knob(where: str, key: str, value) -> None:
    if key == "candidate_steps":
        raise ValueError(f"adaptive config {where}: candidate_steps ({value!r}) belongs inside each batch-size "
                         f'key, e.g. {{"1": {{"candidate_steps": {value!r}}}}}')
    if key not in _KNOBS:
        raise ValueError(f"adaptive config {where}: unknown key {key!r} (value {value!r}); known keys: "
                         f"candidate_steps, {', '.join(_KNOBS)}, and batch-size keys such as \"1\" at the top level")
    _, ok, good = _KNOBS[key]
    if not ok(value):
        raise ValueError(f"adaptive config {where}: {key} must be {good}, got {value!r}")


def validate_adaptive_config(cfg) -> dict[int, dict]:
    """Check an adaptive config (SGLang's JSON shape) and return {batch size: merged slot settings}.

    Raises ValueError naming the offending key and value.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"adaptive config must be a JSON object of batch-size keys, e.g. "
                         f'{{"1": {{"candidate_steps": [1, 3, 5]}}}}; got {type(cfg).__name__} {cfg!r}')
    shared, slots = {}, {}
    for key, value in cfg.items():
        if not isinstance(key, str):
            raise ValueError(f"adaptive config: key {key!r} must be a string")
        if not _BS_KEY.fullmatch(key):
            _check_knob("top level", key, value)
            shared[key] = value
            continue
        bs = int(key)
        if bs < 1:
            raise ValueError(f"adaptive config: batch-size key {key!r} must be >= 1")
        if bs in slots:
            raise ValueError(f"adaptive config: batch-size key {key!r} repeats batch size {bs}")
        if not isinstance(value, dict):
            raise ValueError(f"adaptive config BS {key}: expected an object with candidate_steps, got {value!r}")
        steps = value.get("candidate_steps")
        if not isinstance(steps, list) or not steps or not all(_is_int(s) and s >= 0 for s in steps):
            raise ValueError(f"adaptive config BS {key}: candidate_steps must be a non-empty list of "
                             f"non-negative ints, got {steps!r}")
        for k, v in value.items():
            if k != "candidate_steps":
                _check_knob(f"BS {key}", k, v)
        slots[bs] = value
    if not slots:
        raise ValueError('adaptive config must contain at least one batch-size key, e.g. '
                         f'{{"1": {{"candidate_steps": [1, 3, 7]}}}}; got keys {list(cfg)}')
    merged = {}
    for bs, entry in slots.items():
        settings = {k: default for k, (default, _, _) in _KNOBS.items()}
        settings.update(shared)
        settings.update(entry)
        settings["candidate_steps"] = sorted(set(entry["candidate_steps"]))
        merged[bs] = settings
    return merged


def load_adaptive_config(path: str) -> dict:
    """Read an adaptive config JSON file (SGLang's --speculative-adaptive-config format) and check it."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read adaptive config {path!r}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"adaptive config {path!r} is not valid JSON: {e}") from None
    validate_adaptive_config(cfg)
    return cfg


class _Slot:
    """One batch-size slot: SGLang's AdaptiveStepSlot, plus counters for stats."""

    def __init__(self, bs: int, initial_steps: int, settings: dict):
        self.bs = bs
        self.candidates: list[int] = settings["candidate_steps"]
        self.ema_alpha = settings["ema_alpha"]
        self.update_interval = settings["update_interval"]
        self.warmup_batches = settings["warmup_batches"]
        self.up_hysteresis = settings["up_hysteresis"]
        self.down_hysteresis = settings["down_hysteresis"]
        self.ceiling_coeff = settings["ceiling_coeff"]
        if initial_steps in self.candidates:
            self.steps = initial_steps
        else:
            self.steps = self.candidates[len(self.candidates) // 2]
        self.ema = float(self.steps - 1)     # neutral start: one draft fewer than the steps
        self.batches = 0
        self.switches = 0
        self.batches_per_steps: dict[int, int] = {}

    def update(self, accepted: list[int]) -> bool:
        """One verified batch of this slot; True if its steps changed."""
        if not accepted:
            return False
        self.batches_per_steps[self.steps] = self.batches_per_steps.get(self.steps, 0) + 1
        if self.steps > 0:   # plain iterations carry no acceptance signal
            mean = sum(accepted) / len(accepted)
            self.ema = (1 - self.ema_alpha) * self.ema + self.ema_alpha * mean
        self.batches += 1
        past_warmup = self.batches - self.warmup_batches
        if past_warmup <= 0 or past_warmup % self.update_interval:
            return False
        return self._set(self._target())

    def _target(self) -> int:
        cands, old = self.candidates, self.steps
        i = cands.index(old)
        if old == 0:
            # Probe: after a plain interval try the next candidate up; a slot that never drafted
            # still has its negative neutral EMA, so restart it at that candidate's neutral value.
            nxt = cands[min(i + 1, len(cands) - 1)]
            if nxt > 0 and self.ema < 0:
                self.ema = float(nxt - 1)
            return nxt
        start = i
        while i > 0:
            below = cands[i - 1]
            threshold = (0.5 if below == 0 else below - 0.5) + self.down_hysteresis
            if self.ema > threshold:
                break
            i -= 1
        if i == start:
            while i < len(cands) - 1 and self.ema > cands[i] - 0.5 + self.up_hysteresis:
                i += 1
        if self.ceiling_coeff > 0 and cands[i] <= old:
            cap = max(1, math.ceil(self.ema * self.ceiling_coeff))
            while i > 0 and cands[i] > cap:
                i -= 1
        return cands[i]

    def _set(self, target: int) -> bool:
        if target == self.steps:
            return False
        self.steps = target
        self.switches += 1
        return True

    def describe(self) -> dict:
        return {"candidate_steps": list(self.candidates), "steps": self.steps, "ema_accept_len": self.ema,
                "batches": self.batches, "switches": self.switches,
                "batches_per_steps": {str(k): v for k, v in sorted(self.batches_per_steps.items())},
                "ema_alpha": self.ema_alpha, "update_interval": self.update_interval,
                "warmup_batches": self.warmup_batches, "up_hysteresis": self.up_hysteresis,
                "down_hysteresis": self.down_hysteresis, "ceiling_coeff": self.ceiling_coeff}


class _Request:
    __slots__ = ("slot", "config", "iterations", "spec_iterations", "accepted", "history")

    def __init__(self):
        self.slot: int | None = None
        self.config: SpecConfig | None = None
        self.iterations = 0
        self.spec_iterations = 0
        self.accepted = 0
        self.history: deque = deque(maxlen=_HISTORY)


class SGLangAdaptivePolicy:
    """SGLang's batch-level adaptive steps policy behind CascadeController's interface.

    decide(rids) gives every request of the batch the same chain, SpecConfig(steps), with the
    steps of the slot for len(rids); observe(record) feeds the record's accepted draft counts to
    the slot of len(record.requests), as SGLang's on_verify_complete does after each verify.
    """

    name = "sglang-adaptive"

    def __init__(self, initial_steps: int = 3, config: dict | None = None):
        cfg = DEFAULT_ADAPTIVE_CONFIG if config is None else config
        merged = validate_adaptive_config(cfg)
        self.config = copy.deepcopy(cfg)
        self.candidate_steps: list[int] = sorted({s for e in merged.values() for s in e["candidate_steps"]})
        if not _is_int(initial_steps) or initial_steps not in self.candidate_steps:
            raise ValueError(f"initial_steps {initial_steps!r} is not in the adaptive config's candidate_steps "
                             f"{self.candidate_steps}; pass one of those values")
        self.initial_steps = initial_steps
        self._sizes = sorted(merged)
        self._slots = {bs: _Slot(bs, initial_steps, merged[bs]) for bs in self._sizes}
        self._requests: dict[str, _Request] = {}
        self._finished = 0
        self.iteration = 0
        self._iters_per_config: dict[SpecConfig, int] = {}

    @classmethod
    def from_file(cls, path: str, initial_steps: int = 3) -> "SGLangAdaptivePolicy":
        """A policy from an SGLang adaptive-config JSON file."""
        return cls(initial_steps, load_adaptive_config(path))

    @property
    def max_steps(self) -> int:
        return self.candidate_steps[-1]

    def slot_for(self, batch_size: int) -> int:
        """Batch-size key of the slot that serves a batch of batch_size requests."""
        i = bisect.bisect_right(self._sizes, batch_size) - 1
        return self._sizes[max(i, 0)]

    def steps_for(self, batch_size: int) -> int:
        return self._slots[self.slot_for(batch_size)].steps

    def add_request(self, rid: str) -> None:
        if rid not in self._requests:
            self._requests[rid] = _Request()

    def finish_request(self, rid: str) -> None:
        """A request finished or was aborted: forget it (unknown rids are ignored)."""
        if self._requests.pop(rid, None) is not None:
            self._finished += 1

    def decide(self, rids) -> dict[str, SpecConfig]:
        """The same chain for every request of the batch: the current steps of its batch size's slot."""
        rids = list(rids)
        bs = self.slot_for(len(rids))
        config = SpecConfig(self._slots[bs].steps)
        out = {}
        for rid in rids:
            st = self._requests.get(rid)
            if st is None:
                self.add_request(rid)
                st = self._requests[rid]
            if st.config != config:
                st.history.append((self.iteration, config.label()))
            st.slot, st.config = bs, config
            out[rid] = config
        return out

    def plain_ahead(self, rids, pending: int) -> bool:
        """Plain ahead for sure only where every slot can choose nothing but steps 0: the EMA may move a
        slot's steps at its next update, and the batch size, hence the slot, may change."""
        return all(slot.candidates == [0] for slot in self._slots.values())

    def observe(self, record: IterationRecord) -> None:
        """Feed one verified batch to the slot of its batch size.

        Requests this policy did not decide, or that ran another configuration than decided (a
        per-request override), count in the batch size but not in the slot's acceptance.
        """
        accepted = []
        for obs in record.requests:
            st = self._requests.get(obs.rid)
            if st is None or obs.config != st.config:
                continue
            accepted.append(obs.accepted)
            st.iterations += 1
            st.spec_iterations += obs.config.speculative
            st.accepted += obs.accepted
            self._iters_per_config[obs.config] = self._iters_per_config.get(obs.config, 0) + 1
        if record.requests:
            self._slots[self.slot_for(len(record.requests))].update(accepted)
        self.iteration += 1

    def request_stats(self, rid: str) -> dict:
        """JSON-able state of one running request (KeyError if unknown or finished)."""
        st = self._requests[rid]
        slot = self._slots[st.slot] if st.slot is not None else None
        return {
            "policy": self.name,
            "config": st.config.label() if st.config else None,
            "steps": st.config.steps if st.config else None,
            "slot": str(st.slot) if st.slot is not None else None,
            "slot_steps": slot.steps if slot else None,
            "slot_ema_accept_len": slot.ema if slot else None,
            "iterations": st.iterations,
            "speculating_share": st.spec_iterations / st.iterations if st.iterations else 0.0,
            "accepted_drafts": st.accepted,
            "config_history": [list(x) for x in st.history],
        }

    def summary(self) -> dict:
        """JSON-able aggregate: every slot's state and the configurations run so far."""
        total = sum(self._iters_per_config.values())
        spec = sum(n for c, n in self._iters_per_config.items() if c.speculative)
        return {
            "policy": self.name,
            "mirrors": SGLANG_SOURCE,
            "iterations": self.iteration,
            "requests_running": len(self._requests),
            "requests_finished": self._finished,
            "initial_steps": self.initial_steps,
            "candidate_steps": list(self.candidate_steps),
            "slots": {str(bs): self._slots[bs].describe() for bs in self._sizes},
            "request_iterations_per_config": {c.label(): n for c, n in sorted(self._iters_per_config.items())},
            "speculative_iteration_share": spec / total if total else 0.0,
        }
