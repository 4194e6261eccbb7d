"""The eval runner's smoke size on SGLang's real server (CPU backend, one server per mode): the
report's structure for no speculation, static EAGLE3, SGLang's --speculative-adaptive, --cascade, and
Cascade held at plain decoding (the K=0 tax of the tier it decodes plain requests on).

Greedy text is compared and reported, not required equal: SGLang's bf16 verify pass rounds
differently from its decode pass, so near-ties flip (docs/design.md, section 5);
tests/test_plugin_server.py holds SGLang's greedy output to the near-tie standard with the server's
own logprobs."""

import json

import pytest
from sglang_cascade.plugin.probe import sglang_missing

from evals import run_evals

pytestmark = pytest.mark.slow


def test_smoke_report_on_sglang(tmp_path, monkeypatch):
    reason = sglang_missing()
    if reason:
        pytest.skip(reason)
    served = {}   # the texts every mode's server returned, as the runner hands them to annotate()
    annotate = run_evals.annotate

    def recording(rows, texts):
        served.update(texts)
        return annotate(rows, texts)

    monkeypatch.setattr(run_evals, "annotate", recording)
    run_evals.main(["--target", "sglang", "--smoke", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_smoke_sglang.json").read_text())
    modes = ["plain", "static 3x1x4", "sglang-adaptive", "cascade k0", "cascade"]
    assert list(saved["launch"]) == modes
    assert "sglang.launch_server" in saved["launch"]["plain"] and "--cascade" in saved["launch"]["cascade"]
    assert "--speculative-adaptive" in saved["launch"]["sglang-adaptive"]
    rows = saved["results"]
    assert {(r["mode"], r["workload"]) for r in rows} == {
        (m, w) for m in modes for w in ("code", "math", "extraction", "chat", "mixed")}
    for r in rows:
        assert not r["errors"] and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
        # what the runner compares: each request's decoded text against plain's for the same request
        # (text, not token ids: two id sequences that decode alike count as identical)
        cell = (r["workload"], r["concurrency"])
        mine, plain = served[r["mode"]][cell], served["plain"][cell]
        assert set(mine) == set(plain) and all(isinstance(t, str) and t for t in mine.values()), (r, mine)
        assert r["identical_to_plain"] is (mine == plain), (r["mode"], cell, mine, plain)
        if r["mode"] == "plain":
            assert r["identical_to_plain"] is True
        if r["mode"].startswith("cascade"):
            assert r["iterations"] > 0, r                                   # the plugin's iteration log was read
        if r["mode"] == "cascade k0":
            assert r["share_speculating"] == 0, r
        else:
            assert (r["accept_length"] is None) == (r["mode"] == "plain"), r
    assert saved["goals"]["met"]["greedy_identical_everywhere"] == all(r["identical_to_plain"] for r in rows)
    report = (tmp_path / "eval_smoke_sglang.md").read_text()
    assert "Goals:" in report and "K=0 tax" in report
    assert set(saved["goals"]["k0_tax"]) == {f"{w}/1" for w in ("code", "math", "extraction", "chat", "mixed")}
