"""The eval runner's smoke size on SGLang's real server (CPU backend, one server per mode): the
report's structure for no speculation, static EAGLE3, SGLang's --speculative-adaptive, --cascade, and
(--k0) Cascade held at plain decoding (the K=0 tax of the tier it decodes plain requests on), one
mixed cell: chat requests through SGLang's own /v1/chat/completions (its chat template; the token ids
from sglext.output_ids), code as a raw completion through /generate.

Greedy token ids are compared and reported, not required equal: SGLang's bf16 verify pass rounds
differently from its decode pass, so near-ties flip (docs/design.md, section 5);
tests/test_plugin_server.py holds SGLang's greedy output to the near-tie standard with the server's
own logprobs. The head's recorded training target is planted wrong here (the servers still load the
real, matching pair) so the report must say so where a reader looks first."""

import json

import pytest
from sglang_cascade import workloads
from sglang_cascade.engine.engine import DEFAULT_HEAD_DIR, default_target_path
from sglang_cascade.plugin.probe import sglang_missing
from sglang_cascade.target_digest import target_digest

from evals import run_evals

pytestmark = pytest.mark.slow

PLANTED = "0123456789abcdef"


def test_smoke_report_on_sglang(tmp_path, monkeypatch):
    reason = sglang_missing()
    if reason:
        pytest.skip(reason)
    served = {}   # every request's result, as the runner hands them to annotate()
    annotate = run_evals.annotate
    monkeypatch.setattr(run_evals, "annotate", lambda rows, res, *a: served.update(res) or annotate(rows, res, *a))
    monkeypatch.setattr(run_evals, "head_target_digest", lambda folder: PLANTED)
    run_evals.main(["--target", "sglang", "--smoke", "--k0", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_smoke_sglang.json").read_text())
    assert saved["digests"] == {"target_digest": target_digest(default_target_path()),
                                "head_digest": target_digest(DEFAULT_HEAD_DIR), "head_trained_on": PLANTED,
                                "head_matches_target": False}
    modes = ["plain", "static 3x1x4", "sglang-adaptive", "cascade k0", "cascade"]
    assert list(saved["launch"]) == modes
    assert "sglang.launch_server" in saved["launch"]["plain"] and "--cascade" in saved["launch"]["cascade"]
    assert "--speculative-adaptive" in saved["launch"]["sglang-adaptive"]
    # every answer's token ids came from the server (the client errs a request whose ids are missing)
    assert not any(q["error"] for q in saved["requests"])
    assert {(q["served_workload"], q["format"]) for q in saved["requests"]} == {
        (w, f) for w, (_, f) in workloads.SERVED.items()}
    rows = saved["results"]
    assert {(r["mode"], r["workload"]) for r in rows} == {(m, "mixed") for m in modes}
    plain = {x.rid: x.output_ids for x in served[("plain", 0, "mixed", 1)]}
    for r in rows:
        assert r["errors"] == 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
        assert r["format"] == "chat+completion", r
        # what the runner compares: each request's token ids, as the server sent them, against plain's
        mine = served[(r["mode"], 0, "mixed", 1)]
        assert all(len(x.output_ids) == x.output_tokens > 0 for x in mine), mine
        assert all(isinstance(t, int) for x in mine for t in x.output_ids)
        assert r["identical_to_plain"] is ({x.rid: x.output_ids for x in mine} == plain), r["mode"]
        if r["mode"].startswith("cascade"):
            assert r["iterations"] > 0, r                                   # the plugin's iteration log was read
        if r["mode"] == "cascade k0":
            assert r["share_speculating"] == 0, r
        else:   # SGLang reports no speculative figures without speculation; sglext carries them otherwise
            assert (r["accept_length"] is None) == (r["mode"] == "plain"), r
    cells = {c["mode"]: c for c in saved["cells"]}
    for c in cells.values():
        # the oracle: the one of plain and the static each mode places worst against
        assert c["vs_oracle"]["against"] in ("plain", "static 3x1x4") and c["vs_oracle"]["verdict"] == "unresolved"
    goals = saved["goals"]
    assert goals["greedy_identical_everywhere"] == all(r["identical_to_plain"] for r in rows)
    assert goals["no_errors"] is True and set(goals["k0_tax"]) == {"mixed/1"}
    report = (tmp_path / "eval_smoke_sglang.md").read_text()
    assert report.split("\n\n")[0].startswith(f"MISMATCH: the draft head (digest {target_digest(DEFAULT_HEAD_DIR)}) "
                                              f"was trained on target {PLANTED}")
    assert "Goals" in report and "K=0 tax" in report and "errored requests: none" in report
    assert "**unresolved**" in report or "**missed**" in report
