"""The eval runner's smoke size on SGLang's real server (CPU backend, one server per mode): the
report's structure for no speculation, static EAGLE3, SGLang's --speculative-adaptive, --cascade, and
Cascade held at plain decoding (the K=0 tax of the tier it decodes plain requests on).

Greedy token ids are compared and reported, not required equal: SGLang's bf16 verify pass rounds
differently from its decode pass, so near-ties flip (docs/design.md, section 5);
tests/test_plugin_server.py holds SGLang's greedy output to the near-tie standard with the server's
own logprobs. The head's recorded training target is planted wrong here (the servers still load the
real, matching pair) so the report must say so where a reader looks first."""

import json

import pytest
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
    served = {}   # the token ids every mode's server returned, as the runner hands them to annotate()
    annotate = run_evals.annotate
    monkeypatch.setattr(run_evals, "annotate", lambda rows, ids: served.update(ids) or annotate(rows, ids))
    monkeypatch.setattr(run_evals, "head_target_digest", lambda folder: PLANTED)
    run_evals.main(["--target", "sglang", "--smoke", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_smoke_sglang.json").read_text())
    assert saved["digests"] == {"target_digest": target_digest(default_target_path()),
                                "head_digest": target_digest(DEFAULT_HEAD_DIR), "head_trained_on": PLANTED,
                                "head_matches_target": False}
    modes = ["plain", "static 3x1x4", "sglang-adaptive", "cascade k0", "cascade"]
    assert list(saved["launch"]) == modes
    assert "sglang.launch_server" in saved["launch"]["plain"] and "--cascade" in saved["launch"]["cascade"]
    assert "--speculative-adaptive" in saved["launch"]["sglang-adaptive"]
    rows = saved["results"]
    assert {(r["mode"], r["workload"]) for r in rows} == {
        (m, w) for m in modes for w in ("code", "math", "extraction", "chat", "mixed")}
    for r in rows:
        assert r["errors"] == 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
        # what the runner compares: each request's token ids against plain's for the same request
        cell = (r["workload"], r["concurrency"])
        mine, plain = served[r["mode"]][cell], served["plain"][cell]
        assert set(mine) == set(plain) and sum(map(len, mine.values())) == r["tokens"], (r, mine)
        assert all(isinstance(t, int) for ids in mine.values() for t in ids), mine
        assert r["identical_to_plain"] is (mine == plain), (r["mode"], cell, mine, plain)
        # the oracle: the faster of plain and the static in this cell
        candidates = {x["mode"]: x["tokens_per_s"] for x in rows
                      if (x["workload"], x["concurrency"]) == cell and x["mode"] in ("plain", "static 3x1x4")}
        assert r["oracle"] == max(candidates, key=candidates.get), (r, candidates)
        if r["mode"] == "plain":
            assert r["identical_to_plain"] is True
        if r["mode"].startswith("cascade"):
            assert r["iterations"] > 0, r                                   # the plugin's iteration log was read
        if r["mode"] == "cascade k0":
            assert r["share_speculating"] == 0, r
        else:
            assert (r["accept_length"] is None) == (r["mode"] == "plain"), r
    assert saved["goals"]["met"]["greedy_identical_everywhere"] == all(r["identical_to_plain"] for r in rows)
    assert saved["goals"]["met"]["no_errors"] is True
    report = (tmp_path / "eval_smoke_sglang.md").read_text()
    assert report.split("\n\n")[0].startswith(f"MISMATCH: the draft head (digest {target_digest(DEFAULT_HEAD_DIR)}) "
                                              f"was trained on target {PLANTED}")
    assert "Goals:" in report and "K=0 tax" in report and "errored requests: none" in report
    assert set(saved["goals"]["k0_tax"]) == {f"{w}/1" for w in ("code", "math", "extraction", "chat", "mixed")}
