"""The SGLang plugin's flags: stripping from argv, validation against the server's flags, the plan it
hands to SGLang; hook targets resolve against the installed sglang; `python -m sglang_cascade.plugin
--help`; the entry point."""

import argparse
import json
import subprocess
import sys
from dataclasses import fields
from importlib.metadata import entry_points

import pytest

from sglang_cascade.controller import CascadeConfig
from sglang_cascade.controller.config import flag_name
from sglang_cascade.plugin.flags import (ENV_VAR, CascadeFlagError, PluginSettings, ServerFacts, plan,
                                         split_argv)
from sglang_cascade.plugin.probe import sglang_missing

EAGLE3 = dict(speculative_algorithm="EAGLE3")


def _plan(argv, **facts):
    ns, rest, given = split_argv(argv)
    return plan(ns, given, ServerFacts(**facts))


def test_split_argv_takes_only_plugin_flags():
    argv = ["--model-path", "m", "--cascade", "--cascade-set-iters=8", "--port", "30000",
            "--cascade-batch-cost", "marginal", "--speculative-algorithm", "EAGLE3"]
    ns, rest, given = split_argv(argv)
    assert rest == ["--model-path", "m", "--port", "30000", "--speculative-algorithm", "EAGLE3"]
    assert ns.cascade and ns.cascade_set_iters == 8 and ns.cascade_batch_cost == "marginal"
    assert given == {"--cascade", "--cascade-set-iters", "--cascade-batch-cost"}


def test_without_cascade_argv_is_untouched():
    ns, rest, given = split_argv(["--model-path", "m", "--speculative-algorithm", "EAGLE3"])
    assert not ns.cascade and rest == ["--model-path", "m", "--speculative-algorithm", "EAGLE3"] and not given


@pytest.mark.parametrize("argv, flag", [
    (["--cascade-set-iters", "8"], "--cascade-set-iters"),                 # knob without --cascade
    (["--cascade", "--cascade-bogus", "1"], "--cascade-bogus"),             # unknown plugin flag
    (["--cascade", "--cascade-trial-iters", "abc"], "--cascade-trial-iters"),   # malformed value
])
def test_bad_plugin_flags_name_the_flag(argv, flag):
    with pytest.raises(CascadeFlagError, match=flag):
        split_argv(argv)


@pytest.mark.parametrize("argv, facts, flag", [
    (["--cascade"], {}, "--speculative-algorithm"),
    (["--cascade"], dict(speculative_algorithm="NGRAM"), "--speculative-algorithm"),
    (["--cascade"], dict(EAGLE3, speculative_eagle_topk=2), "--speculative-eagle-topk"),
    (["--cascade", "--cascade-candidates", "0,2x2x4"], EAGLE3, "--cascade-candidates"),        # not a chain
    (["--cascade", "--cascade-candidates", "0,3x1x3"], EAGLE3, "--cascade-candidates"),        # chain verifies S+1
    (["--cascade", "--cascade-candidates", "0,1x1x2,5x1x6"], dict(EAGLE3, speculative_num_steps=3),
     "--speculative-num-steps"),                                                                # deeper than the server
    (["--cascade", "--cascade-candidates", "0,1x1"], EAGLE3, None),                              # valid (TOKENS implied)
    (["--cascade", "--cascade-candidates", "1xz"], EAGLE3, "--cascade-candidates"),            # malformed
    (["--cascade", "--cascade-trial-iters", "0"], EAGLE3, "--cascade-trial-iters"),
    (["--cascade", "--cascade-batch-cost", "cheap"], EAGLE3, "--cascade-batch-cost"),
    (["--cascade", "--cascade-set-iters", "64", "--cascade-max-backoff", "32"], EAGLE3, "--cascade-max-backoff"),
    (["--cascade"], dict(EAGLE3, speculative_adaptive=True, speculative_adaptive_config="a.json"),
     "--speculative-adaptive-config"),
    (["--cascade"], dict(EAGLE3, device="cpu", cuda_graph_backend_decode="full"), "--cuda-graph-backend-decode"),
    (["--cascade", "--cascade-iteration-log", "/no/such/folder/log.jsonl"], EAGLE3, "--cascade-iteration-log"),
])
def test_plan_validates_against_server_flags(argv, facts, flag):
    if flag is None:
        _plan(argv, **facts)
        return
    with pytest.raises(CascadeFlagError, match=flag) as info:
        _plan(argv, **facts)
    fixes = ("set ", "add ", "drop", "raise", "write", "use ", "must", "one of", "create")
    assert any(w in str(info.value).lower() for w in fixes), info.value


def test_plan_turns_on_sglang_adaptive_states_for_the_ladder():
    settings, extra = _plan(["--cascade", "--cascade-candidates", "0,1x1x2,3x1x4"],
                            **EAGLE3, speculative_num_steps=5, device="cpu")
    assert settings.captured_steps == (0, 1, 3, 5)          # the ladder's steps and the server's own
    assert extra[0] == "--speculative-adaptive"
    config = extra[extra.index("--speculative-adaptive-config") + 1]
    assert json.load(open(config))["1"]["candidate_steps"] == [0, 1, 3, 5]
    assert extra[-2:] == ["--cuda-graph-backend-decode", "disabled"]
    assert "--speculative-num-steps" not in extra            # the user's own value stands


def test_default_ladder_is_chains_up_to_the_server_depth():
    settings, extra = _plan(["--cascade"], **EAGLE3, speculative_num_steps=2, speculative_eagle_topk=1,
                            speculative_adaptive=True)
    assert [c.label() for c in settings.cascade.ladder] == ["plain", "s1k1n2", "s2k1n3"]
    assert "--speculative-adaptive" not in extra and "--speculative-eagle-topk" not in extra
    settings, extra = _plan(["--cascade"], **EAGLE3)
    assert max(c.steps for c in settings.cascade.ladder) == 3
    assert extra[extra.index("--speculative-num-steps") + 1] == "3"


def test_settings_round_trip_through_the_environment(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings, _ = _plan(["--cascade", "--cascade-set-iters", "8", "--cascade-utility-threshold", "1.05",
                         "--cascade-iteration-log", "its.jsonl"], **EAGLE3)
    monkeypatch.setenv(ENV_VAR, settings.to_json())
    back = PluginSettings.from_environ()
    assert back == settings and back.cascade.set_iters == 8 and back.cascade.utility_threshold == 1.05
    assert back.iteration_log == str(tmp_path / "its.jsonl")   # absolute: schedulers need not share the cwd
    assert back.skip_plain_draft_extend
    settings, _ = _plan(["--cascade", "--cascade-plain-draft-extend", "run"], **EAGLE3)
    monkeypatch.setenv(ENV_VAR, settings.to_json())
    assert not PluginSettings.from_environ().skip_plain_draft_extend


def test_help_lists_every_cascade_flag():
    out = subprocess.run([sys.executable, "-m", "sglang_cascade.plugin", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "--cascade " in out
    for f in fields(CascadeConfig):
        assert flag_name(f.name) in out


def test_cascade_flag_table_is_the_controllers():
    parser = argparse.ArgumentParser()
    CascadeConfig.add_cli_args(parser)
    theirs = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    from sglang_cascade.plugin.flags import cascade_parser
    ours = {a.option_strings[0] for a in cascade_parser()._actions if a.option_strings and a.dest != "help"}
    assert ours == theirs | {"--cascade", "--cascade-plain-draft-extend", "--cascade-iteration-log",
                             "--cascade-allow-untested-sglang", "--cascade-strict-target-hash"}


def test_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("cascade") == "sglang_cascade.plugin:register", \
        "run `pip install --no-deps -e .` to refresh the entry points"


def test_every_hooked_target_has_its_signature_checked():
    """Registration and the self-check read one table (hooks.py); each hooked function, and each method
    of a replaced class that SGLang calls, is in the signature table the self-check compares."""
    from sglang_cascade.plugin.hooks import HOOKS
    from sglang_cascade.plugin.selfcheck import SIGNATURES

    for hook in HOOKS:
        if hook.kind == "AROUND":
            assert hook.target in SIGNATURES, hook.target
        else:
            assert any(name.startswith(hook.target + ".") for name in SIGNATURES), hook.target


def test_hook_targets_resolve_against_installed_sglang():
    """A version drift of SGLang fails here, loudly, as the plugin refuses to start in the server; another
    version is refused even where the signatures match, unless the user allows it."""
    reason = sglang_missing("sglang")
    if reason:
        pytest.skip(reason)
    code = ("import pkgutil, sglang\n"
            "from sglang_cascade.plugin.hooks import HOOKS\n"
            "from sglang_cascade.plugin.selfcheck import check_installed\n"
            "problems = check_installed()\n"
            "[pkgutil.resolve_name(h.target) and h.resolve() for h in HOOKS]\n"
            "sglang.__version__ = '0.5.99'\n"
            "refused, allowed = check_installed(), check_installed(allow_untested=True)\n"
            "problems += [] if any('found 0.5.99' in p for p in refused) else ['another version was not refused']\n"
            "problems += allowed\n"
            "print('\\n'.join(problems)); raise SystemExit(bool(problems))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
