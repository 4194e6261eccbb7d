"""`--cascade*` flags for SGLang's launcher: parse, validate against the server's own flags, plan.

SGLang's parser rejects unknown flags and its ServerArgs cannot grow fields, so the plugin takes
its flags out of argv before SGLang parses it (argv_hook.py) and hands the result to the scheduler
processes through one environment variable. Pure Python (no sglang import): the rules here are
unit-tested without a server, and `python -m sglang_cascade.plugin --help` stays instant.

Cascade's batch tier runs on SGLang's adaptive runtime states (one pre-built draft/verify state per
step count, topk 1), so the plan turns SGLang's adaptive mode on with a config listing exactly the
step counts the Cascade ladder needs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

from sglang_cascade.controller import CascadeConfig, SpecConfig, format_candidates, parse_candidates

ENV_VAR = "SGLANG_CASCADE_PLUGIN"   # JSON PluginSettings; set only while --cascade is on
SUPPORTED_SGLANG = "0.5.23"
DEFAULT_SERVER_STEPS = 3   # chain depth when neither --speculative-num-steps nor candidates say


class CascadeFlagError(ValueError):
    """A bad `--cascade*` flag or combination; the message names the flag and the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CascadeFlagError(f"{message}; see `python -m sglang_cascade.plugin --help`")


def cascade_parser(prog: str = "python -m sglang_cascade.plugin", add_help: bool = True) -> argparse.ArgumentParser:
    """The plugin's flags: --cascade plus CascadeConfig's --cascade-* knobs (one flag table)."""
    parser = _Parser(prog=prog, add_help=add_help, allow_abbrev=False,
                     description="Flags the sglang-cascade plugin adds to `python -m sglang.launch_server` "
                                 "and `sglang serve`. Everything else is SGLang's own.")
    parser.add_argument("--cascade", action="store_true",
                        help="turn Cascade on: per-request speculation budgets chosen from measured utility "
                             "(needs --speculative-algorithm EAGLE or EAGLE3 and --speculative-eagle-topk 1)")
    CascadeConfig.add_cli_args(parser)
    ladder = next(a for a in parser._actions if a.dest == "cascade_candidates")
    ladder.help = (f"comma-separated STEPSxTOPKxTOKENS ladder of chains (topk 1, S steps verify S+1 tokens), "
                   f"e.g. 0,1x1x2,3x1x4; plain is always added. Default: every chain up to the server's "
                   f"--speculative-num-steps ({DEFAULT_SERVER_STEPS} if not given)")
    ladder.default = None
    parser.add_argument("--cascade-plain-draft-extend", choices=("skip", "run"), default="skip",
                        help="skip: where the whole batch decodes plain and the controller keeps every request "
                             "plain for the next iteration, skip the draft model's extend after the verify "
                             "(SGLang's SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND, per iteration); the draft's KV "
                             "cache at the skipped positions stays stale. run: always extend, as SGLang's "
                             "steps-0 tier does (default: skip)")
    parser.add_argument("--cascade-allow-untested-sglang", action="store_true",
                        help=f"run Cascade on an SGLang other than {SUPPORTED_SGLANG} where every hooked signature "
                             f"still matches (default: refuse; the hooks rely on more than signatures)")
    parser.add_argument("--cascade-strict-target-hash", action="store_true",
                        help="refuse to start when the draft head's config.json records that it was trained on "
                             "another target than --model-path (default: a warning naming both digests)")
    parser.add_argument("--cascade-iteration-log", metavar="FILE", default=None,
                        help="append one JSON line per decode iteration (TP rank 0): wall time, the batch's steps, "
                             "whether it skipped the draft extend, each request's budget and accepted drafts, and "
                             "distinct experts per MoE layer as routed and as loaded after cut rows are rewritten, "
                             "and the cost model's routing estimate")
    return parser


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str], set[str]]:
    """(plugin namespace, argv without plugin flags, plugin flags given explicitly)."""
    parser = cascade_parser(add_help=False)
    ns, rest = parser.parse_known_args(list(argv))
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--cascade")}
    unknown = sorted(a.split("=", 1)[0] for a in rest if a.startswith("--cascade"))
    if unknown:
        raise CascadeFlagError(f"unknown flag {unknown[0]}; the plugin's flags are listed by "
                               f"`python -m sglang_cascade.plugin --help`")
    if not ns.cascade and given:
        raise CascadeFlagError(f"{sorted(given)[0]} given without --cascade: add --cascade to turn Cascade "
                               f"on, or drop the flag")
    return ns, rest, given


@dataclass(frozen=True)
class ServerFacts:
    """The SGLang flags the plan depends on, as the user gave them (None = not given)."""

    model_path: str | None = None
    speculative_draft_model_path: str | None = None
    speculative_algorithm: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_adaptive: bool = False
    speculative_adaptive_config: str | None = None
    device: str | None = None
    cuda_graph_backend_decode: str | None = None
    disable_decode_cuda_graph: bool = False
    enable_metrics: bool = False


@dataclass(frozen=True)
class PluginSettings:
    """What every scheduler needs: the Cascade config and the step counts SGLang captures."""

    cascade: CascadeConfig
    captured_steps: tuple[int, ...]
    iteration_log: str | None = None
    metrics: bool = False   # SGLang's --enable-metrics: Cascade's Prometheus series too
    skip_plain_draft_extend: bool = True
    allow_untested_sglang: bool = False

    def to_json(self) -> str:
        return json.dumps({"cascade": self.cascade.to_cli_args(), "captured_steps": list(self.captured_steps),
                           "iteration_log": self.iteration_log, "metrics": self.metrics,
                           "skip_plain_draft_extend": self.skip_plain_draft_extend,
                           "allow_untested_sglang": self.allow_untested_sglang})

    @classmethod
    def from_json(cls, text: str) -> "PluginSettings":
        data = json.loads(text)
        ns = cascade_parser(add_help=False).parse_args(data["cascade"])
        return cls(CascadeConfig.from_cli_args(ns), tuple(data["captured_steps"]), data.get("iteration_log"),
                   data.get("metrics", False), data.get("skip_plain_draft_extend", True),
                   data.get("allow_untested_sglang", False))

    @classmethod
    def from_environ(cls) -> "PluginSettings | None":
        text = os.environ.get(ENV_VAR)
        return cls.from_json(text) if text else None


def _chain_ladder(steps: int) -> str:
    return format_candidates([SpecConfig(0)] + [SpecConfig(s) for s in range(1, steps + 1)])


def plan(ns: argparse.Namespace, given: set[str], facts: ServerFacts) -> tuple[PluginSettings, list[str]]:
    """Validate --cascade against the server's flags; return the settings and the SGLang flags to add.

    Raises CascadeFlagError naming the flag and the fix.
    """
    algo = (facts.speculative_algorithm or "").upper()
    if algo not in ("EAGLE", "EAGLE3"):
        raise CascadeFlagError(
            f"--cascade needs --speculative-algorithm EAGLE or EAGLE3 (given: "
            f"{facts.speculative_algorithm or 'none'}): add --speculative-algorithm EAGLE3 "
            f"--speculative-draft-model-path HEAD")
    topk = facts.speculative_eagle_topk
    if topk not in (None, 1):
        raise CascadeFlagError(
            f"--speculative-eagle-topk {topk}: Cascade drives SGLang's adaptive runtime states, which run chains "
            f"only (topk 1); set --speculative-eagle-topk 1 (per-request pruning of wider trees is not "
            f"implemented yet)")
    if facts.speculative_adaptive_config:
        raise CascadeFlagError(
            f"--speculative-adaptive-config {facts.speculative_adaptive_config}: with --cascade the plugin writes "
            f"SGLang's adaptive config itself (the step counts its ladder needs); drop the flag, set the ladder "
            f"with --cascade-candidates")
    on_cpu = (facts.device or "").lower() == "cpu"
    graphs = facts.cuda_graph_backend_decode
    if on_cpu and graphs not in (None, "disabled"):
        raise CascadeFlagError(
            f"--cuda-graph-backend-decode {graphs}: on --device cpu SGLang's adaptive runtime states cannot "
            f"build CUDA-graph runners; use --cuda-graph-backend-decode disabled (or leave it out: the plugin "
            f"sets it)")

    server_steps = facts.speculative_num_steps
    if "--cascade-candidates" in given:
        try:
            ladder = parse_candidates(ns.cascade_candidates)
        except ValueError as exc:
            raise CascadeFlagError(str(exc)) from None
        for c in ladder:
            if c.steps and (c.topk != 1 or c.draft_tokens != c.steps + 1):
                raise CascadeFlagError(
                    f"--cascade-candidates: {c.steps}x{c.topk}x{c.draft_tokens} is not a chain; the server runs "
                    f"topk 1, where S steps verify S+1 tokens: write {c.steps}x1x{c.steps + 1}")
        deepest = max(c.steps for c in ladder)
        if server_steps is not None and deepest > server_steps:
            raise CascadeFlagError(
                f"--cascade-candidates: a candidate needs {deepest} draft steps but the server runs at most "
                f"--speculative-num-steps {server_steps}; raise --speculative-num-steps to {deepest} or drop "
                f"the deeper candidates")
        candidates = ns.cascade_candidates
    else:   # the generic default has topk-2 trees: use chains up to the server's depth instead
        candidates = _chain_ladder(server_steps or DEFAULT_SERVER_STEPS)
    ns = argparse.Namespace(**{**vars(ns), "cascade_candidates": candidates})
    try:
        cascade = CascadeConfig.from_cli_args(ns)
    except ValueError as exc:
        raise CascadeFlagError(str(exc)) from None

    log = ns.cascade_iteration_log
    if log is not None:
        log = os.path.abspath(log)
        folder = os.path.dirname(log)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise CascadeFlagError(f"--cascade-iteration-log {ns.cascade_iteration_log}: folder {folder} does not "
                                   f"exist or is not writable; create it or choose another path")

    if server_steps is None:
        server_steps = max(c.steps for c in cascade.ladder)
    captured = tuple(sorted({c.steps for c in cascade.ladder} | {server_steps}))
    extra = ["--speculative-adaptive-config", write_adaptive_config(captured)]
    if not facts.speculative_adaptive:
        extra.insert(0, "--speculative-adaptive")
    if facts.speculative_num_steps is None:
        extra += ["--speculative-num-steps", str(server_steps)]
    if facts.speculative_eagle_topk is None:
        extra += ["--speculative-eagle-topk", "1"]
    if on_cpu and graphs is None and not facts.disable_decode_cuda_graph:
        extra += ["--cuda-graph-backend-decode", "disabled"]
    return (PluginSettings(cascade, captured, log, bool(facts.enable_metrics),
                           ns.cascade_plain_draft_extend == "skip", ns.cascade_allow_untested_sglang), extra)


def write_adaptive_config(captured_steps) -> str:
    """SGLang's adaptive config with one batch-size slot holding every step count Cascade may pick.

    Named by content, so repeated launches reuse one file instead of leaving a new one each time.
    """
    text = json.dumps({"1": {"candidate_steps": list(captured_steps)},
                       "_written_by": "sglang-cascade: Cascade picks the steps; SGLang's EMA is unused"})
    folder = os.path.join(tempfile.gettempdir(), "sglang-cascade")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"adaptive-{hashlib.sha1(text.encode()).hexdigest()[:12]}.json")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path
