"""AROUND hook on `sglang.srt.server_args.prepare_server_args`: take `--cascade*` out of argv.

Runs in the launcher process (`python -m sglang.launch_server`, `sglang serve`) before any model
loads. Where a draft head is given, it checks that the head was trained on this target (a warning,
or a refusal with --cascade-strict-target-hash). Without --cascade it otherwise only clears a stale
plugin environment, so child processes stay inert.
With --cascade it validates the flags against SGLang's own (read with SGLang's own parser), adds
the adaptive-mode flags Cascade needs, and exports the settings for the schedulers. A bad flag
ends the launch with exit status 2 and a message naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys

from sglang_cascade.target_digest import TargetMismatch, check_pair

from .flags import ENV_VAR, SUPPORTED_SGLANG, CascadeFlagError, ServerFacts, plan, split_argv
from .log import announce


def prepare_server_args_hook(original, argv, *args, **kwargs):
    try:
        ns, rest, given = split_argv(argv)
    except CascadeFlagError as exc:
        _refuse(exc)
    facts = _server_facts(rest)
    _check_target(facts, strict=ns.cascade_strict_target_hash)
    if not ns.cascade:
        os.environ.pop(ENV_VAR, None)
        return original(rest, *args, **kwargs)
    try:
        settings, extra = plan(ns, given, facts)
    except CascadeFlagError as exc:
        _refuse(exc)
    server_args = original(rest + extra, *args, **kwargs)
    _refuse_if_sglang_disables_adaptive(server_args)
    from .selfcheck import check_installed
    problems = check_installed(settings.allow_untested_sglang)
    if problems:
        _refuse(CascadeFlagError("--cascade: the installed SGLang differs where the plugin hooks in: " +
                                 "; ".join(problems) + ". Install sglang==" + SUPPORTED_SGLANG + " or drop --cascade"))
    os.environ[ENV_VAR] = settings.to_json()
    announce(f"Cascade on: ladder {' '.join(c.label() for c in settings.cascade.ladder)}; SGLang adaptive "
             f"runtime states for steps {list(settings.captured_steps)}; added {' '.join(extra)}")
    return server_args


def _server_facts(argv: list[str]) -> ServerFacts:
    """The SGLang flags the plan needs, read with SGLang's own parser (its other flags ignored)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(parser)
    ns, _ = parser.parse_known_args(argv)
    return ServerFacts(**{k: getattr(ns, k, None) for k in ServerFacts.__dataclass_fields__})


def _check_target(facts: ServerFacts, strict: bool) -> None:
    """Whether the draft head was trained on this target (target_digest.py), before any model loads."""
    if not (facts.model_path and facts.speculative_draft_model_path):
        return
    try:
        announce(check_pair(facts.model_path, facts.speculative_draft_model_path, strict,
                            "--cascade-strict-target-hash"))
    except TargetMismatch as exc:
        _refuse(exc)


def _refuse_if_sglang_disables_adaptive(server_args) -> None:
    """SGLang silently falls back to static steps in some set-ups; Cascade would then steer nothing."""
    from sglang.srt.speculative.adaptive_spec_params import adaptive_unsupported_reason

    reason = adaptive_unsupported_reason(server_args)
    if reason:
        _refuse(CascadeFlagError(f"--cascade: SGLang would turn its adaptive runtime states off ({reason}), and "
                                 f"Cascade steers the server through them; drop the conflicting flag"))


def _refuse(exc: Exception):
    print(f"sglang-cascade: error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2)

