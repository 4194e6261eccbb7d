"""Cascade's knobs, their defaults and their `--cascade-*` flags.

Every field maps to one flag: field `trial_iters` <-> `--cascade-trial-iters`. Defaults marked
"paper" restate Cascade (arXiv 2506.20675) as summarised in docs/design.md, section 3; "ours" are
choices of this project, with the reason next to them. FLAGS.md in this folder tabulates the same.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Iterable, Union

from .types import PLAIN, SpecConfig

# Chains for small budgets, small trees (topk 2) for larger ones: acceptance along a chain decays
# geometrically with depth, so beyond ~3 drafts an extra node buys more as a sibling than as depth.
DEFAULT_CANDIDATES = "0,1x1x2,2x1x3,3x1x4,4x2x6,5x2x8"

BATCH_COSTS = ("uniform", "allocated", "marginal")

_INT_LIMITS = {  # field -> (minimum, what the flag sets: for help and error messages)
    "warmup_iters": (0, "plain iterations a request runs first to measure its plain-decode cost t_base"),
    "base_refresh": (1, "age in iterations after which t_base is re-measured"),
    "trial_iters": (1, "iterations each test trial runs one configuration"),
    "max_trials": (1, "maximum trials per test phase"),
    "set_iters": (1, "iterations a set phase runs the chosen configuration"),
    "max_backoff": (1, "maximum length in iterations of a plain set phase (which doubles each time)"),
    "prior_samples": (0, "utilities other requests measured before a new request starts from their "
                         "estimate instead of testing (0: every request tests from scratch)"),
}


def flag_name(field_name: str) -> str:
    return "--cascade-" + field_name.replace("_", "-")


def parse_candidates(text: str) -> tuple[SpecConfig, ...]:
    """Parse '0,1x1x2,3x1x4' (STEPSxTOPKxTOKENS, comma separated) into SpecConfigs."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            out.append(SpecConfig.parse(item))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{flag_name('candidates')}: bad entry {item.strip()!r}: {exc}. Write each entry as "
                f"STEPSxTOPKxTOKENS (TOKENS = tree nodes verified, root included: a chain of S steps "
                f"is Sx1x(S+1)), '0' for plain, e.g. {DEFAULT_CANDIDATES}") from None
    return tuple(out)


def format_candidates(configs: Iterable[SpecConfig]) -> str:
    """Inverse of parse_candidates."""
    return ",".join("0" if not c.steps else f"{c.steps}x{c.topk}x{c.draft_tokens}" for c in configs)


def _ladder(candidates: Iterable[Union[SpecConfig, str]]) -> tuple[SpecConfig, ...]:
    configs = [c if isinstance(c, SpecConfig) else SpecConfig.parse(str(c)) for c in candidates]
    if len(set(configs)) != len(configs):
        raise ValueError(f"{flag_name('candidates')}: duplicate entries in {[c.label() for c in configs]}; "
                         f"list each configuration once")
    spec = sorted((c for c in configs if c.speculative), key=lambda c: (c.draft_tokens, c.steps, c.topk))
    return (PLAIN, *spec)   # plain alone: Cascade never speculates (measures what its plain tier costs)


@dataclass(frozen=True)
class CascadeConfig:
    """Cascade policy knobs (see FLAGS.md).

    candidates: the ladder hill-climbing walks, ordered by draft tokens (then steps, topk); plain is
        always its bottom rung, added if absent. Accepts SpecConfigs or a 'STEPSxTOPKxTOKENS,...'
        string. Default (ours): 0,1x1x2,2x1x3,3x1x4,4x2x6,5x2x8 - chains, then small trees.
    warmup_iters: 3 (ours; the paper says "a few" plain iterations at a request's start). 0 skips it;
        the plain cost then comes from the cost model until the request runs plain alone. Only a
        request first decided alone warms up: in a batch its clock measures nothing of its own.
    base_refresh: 100 (paper: t_base refreshed about every 100 iterations).
    trial_iters: 4 (paper). max_trials: 4 (paper: a test phase is at most 16 iterations).
    set_iters: 16 (paper). Ours: a speculative set phase whose utility so far is below
        utility_threshold after a multiple of trial_iters iterations stops there and tests.
    max_backoff: 256 (ours; the paper doubles the plain set phase without a stated cap). 16 doubled
        four times: a request that starts to profit from speculation waits at most 256 iterations,
        and a losing request's re-tests (one 4-iteration trial) then cost under 2% of its iterations.
    utility_threshold: 1.0 (paper: speculate only when U > 1).
    stop_tolerance: 0.10 (paper: stop hill-climbing when consecutive utilities are within 10%).
    prior_samples: 4 (ours; the paper tests every request from scratch). Once other requests have
        measured this many utilities, a new request skips its first test: it runs one set phase on
        the rung whose recent utility (an EMA over all requests' trials and set phases) is best and
        beats utility_threshold, else plain, then tests as usual. A request shorter than a test and
        a set phase otherwise spends most of its life testing; its own later tests correct a
        population estimate that does not fit it. A plain start backs off as the population does:
        set_iters doubled for each test in a row (any request's) that ended plain, up to
        max_backoff, with one new request in 2^doublings kept at set_iters so that testing goes on
        (SharedPrior). 0 turns this off.
    batch_cost: how a request's cost is counted at batch > 1 (ours; the paper ran batch 1, where
        all agree). "uniform" (default): the predicted batch time had every request run this
        request's configuration, over the batch all plain: what the configuration costs a request
        once others run it too, so a request exploring alone is not charged the draft steps and
        expert reads the whole batch would share (which kept batches plain where speculating
        together paid). "allocated": the batch's predicted speculation time split over the
        speculating requests in proportion to their marginal times, so U > 1 for every speculating
        request means the batch's tokens per second rise. "marginal": its marginal time only, a
        stricter test that pays off when freed time would be filled with more requests. See
        MoECostModel.relative_costs.
    """

    candidates: Union[str, tuple] = DEFAULT_CANDIDATES
    warmup_iters: int = 3
    base_refresh: int = 100
    trial_iters: int = 4
    max_trials: int = 4
    set_iters: int = 16
    max_backoff: int = 256
    prior_samples: int = 4
    utility_threshold: float = 1.0
    stop_tolerance: float = 0.10
    batch_cost: str = "uniform"

    def __post_init__(self):
        cands = self.candidates
        ladder = parse_candidates(cands) if isinstance(cands, str) else cands
        object.__setattr__(self, "candidates", _ladder(ladder))
        for name, (low, meaning) in _INT_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{flag_name(name)} must be an integer >= {low} (got {value!r}); "
                                 f"it sets the {meaning}")
        if self.max_backoff < self.set_iters:
            raise ValueError(f"{flag_name('max_backoff')} ({self.max_backoff}) must be >= "
                             f"{flag_name('set_iters')} ({self.set_iters}): it caps the doubling of "
                             f"the set phase; raise it or lower {flag_name('set_iters')}")
        if not (isinstance(self.utility_threshold, (int, float)) and self.utility_threshold > 0):
            raise ValueError(f"{flag_name('utility_threshold')} must be a number > 0 (got "
                             f"{self.utility_threshold!r}): speculation is kept when utility exceeds "
                             f"it; 1.0 means 'faster than plain decoding'")
        if not (isinstance(self.stop_tolerance, (int, float)) and 0 <= self.stop_tolerance < 1):
            raise ValueError(f"{flag_name('stop_tolerance')} must be in [0, 1) (got "
                             f"{self.stop_tolerance!r}): the relative utility change below which "
                             f"hill-climbing stops, e.g. 0.1")
        if self.batch_cost not in BATCH_COSTS:
            raise ValueError(f"{flag_name('batch_cost')} must be one of {', '.join(BATCH_COSTS)} "
                             f"(got {self.batch_cost!r})")

    @property
    def ladder(self) -> tuple[SpecConfig, ...]:
        """Candidates in climbing order; index 0 is PLAIN."""
        return self.candidates

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add every `--cascade-*` knob to `parser` (values are validated by from_cli_args)."""
        group = parser.add_argument_group("Cascade speculation policy")
        defaults = CascadeConfig()
        doc = {
            "candidates": "comma-separated STEPSxTOPKxTOKENS ladder, e.g. 0,1x1x2,3x1x4 (plain always added)",
            "utility_threshold": "speculate only if utility (speedup over plain) exceeds this",
            "stop_tolerance": "stop hill-climbing when consecutive utilities differ by less than this fraction",
            "batch_cost": "request cost at batch > 1: the batch's time had every request run its "
                          "configuration (uniform), its marginal time plus a share of the shared time "
                          "(allocated), or its marginal time only (marginal)",
            **{name: meaning for name, (_, meaning) in _INT_LIMITS.items()},
        }
        for f in fields(CascadeConfig):
            default = getattr(defaults, f.name)
            if f.name == "candidates":
                kind, default, metavar = str, format_candidates(default), "LADDER"
            else:
                kind = type(default)
                metavar = {int: "N", float: "X", str: "{" + ",".join(BATCH_COSTS) + "}"}[kind]
            group.add_argument(flag_name(f.name), type=kind, default=default, metavar=metavar,
                               help=f"{doc[f.name]} (default: {default})")

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "CascadeConfig":
        """Build from parsed args; flags absent from `ns` keep their defaults."""
        values = {}
        for f in fields(cls):
            dest = flag_name(f.name)[2:].replace("-", "_")
            if getattr(ns, dest, None) is not None:
                values[f.name] = getattr(ns, dest)
        return cls(**values)

    def to_cli_args(self) -> list[str]:
        """Flags that rebuild this config through add_cli_args/from_cli_args (e.g. for a subprocess)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "candidates":
                value = format_candidates(value)
            out += [flag_name(f.name), str(value)]
        return out
