"""The eval runner end to end in its smoke size: real servers (one per mode) on 127.0.0.1, the
embedded default MoE and head, every workload; the report's structure and greedy equality."""

import gzip
import json

import pytest

from evals import run_evals

pytestmark = pytest.mark.slow


def test_smoke_report(tmp_path):
    payload = run_evals.main(["--smoke", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_smoke_engine.json").read_text())
    assert saved["goals"] == payload["goals"]
    for key in ("machine", "commit", "date", "launch", "args", "results"):
        assert saved[key]
    modes = ["plain", "static 3x1x4", "sglang-adaptive", "cascade"]
    assert list(saved["launch"]) == modes
    assert "--mode adaptive" in saved["launch"]["sglang-adaptive"]
    rows = saved["results"]
    assert {(r["mode"], r["workload"]) for r in rows} == {
        (m, w) for m in modes for w in ("code", "math", "extraction", "chat", "mixed")}
    for r in rows:
        assert not r["errors"] and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
        assert r["identical_to_plain"], f"{r['mode']} {r['workload']}: greedy text differs from plain"
        assert r["iterations"] > 0 and r["distinct_experts_per_verify"] >= 4.0
        assert r["oracle"] == "static 3x1x4"
        speculated = r["share_speculating"] > 0
        assert speculated == (r["mode"] != "plain") or r["mode"] == "cascade"
    assert saved["goals"]["met"]["greedy_identical_everywhere"]
    table = (tmp_path / "eval_smoke_engine.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "Goals:" in table
    for name in ("throughput", "cascade_choices", "verify_cost"):
        assert (tmp_path / f"eval_smoke_engine_{name}.png").read_bytes()[:4] == b"\x89PNG"
    with gzip.open(tmp_path / "eval_smoke_engine.iterations.json.gz", "rt") as f:
        logs = json.load(f)
    assert set(logs) == set(modes) and all(logs[m] for m in modes)
    assert all(len(it["rids"]) == it["batch"] for it in logs["cascade"])
