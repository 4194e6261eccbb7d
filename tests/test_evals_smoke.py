"""The eval runner end to end at the smoke size: real servers (one per mode) on 127.0.0.1, the
embedded default MoE and head, every workload; the report's structure, greedy equality and the oracle.

`--smoke` runs one static configuration, which makes the oracle (the best static of each cell) no
choice at all; this runs the smoke size with two statics so a wrong pick shows."""

import gzip
import json

import pytest

from evals import run_evals

pytestmark = pytest.mark.slow

STATICS = ["1x1x2", "3x1x4"]
# --smoke's sizes (1 prompt per workload, 8 tokens, concurrency 1) with STATICS instead of its one static
SMOKE = ["--prompts", "1", "--max-new-tokens", "8", "--concurrency", "1", "--static", ",".join(STATICS),
         "--out", "eval_smoke_engine"]


def test_smoke_report(tmp_path):
    payload = run_evals.main([*SMOKE, "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_smoke_engine.json").read_text())
    assert saved["goals"] == payload["goals"]
    for key in ("machine", "commit", "date", "launch", "args", "results"):
        assert saved[key]
    modes = ["plain", *(f"static {s}" for s in STATICS), "sglang-adaptive", "cascade"]
    assert list(saved["launch"]) == modes
    assert "--mode adaptive" in saved["launch"]["sglang-adaptive"]
    rows = saved["results"]
    assert {(r["mode"], r["workload"]) for r in rows} == {
        (m, w) for m in modes for w in ("code", "math", "extraction", "chat", "mixed")}
    for r in rows:
        assert not r["errors"] and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
        assert r["identical_to_plain"], f"{r['mode']} {r['workload']}: greedy text differs from plain"
        assert r["iterations"] > 0 and r["distinct_experts_per_verify"] >= 4.0
        speculated = r["share_speculating"] > 0
        assert speculated == (r["mode"] != "plain") or r["mode"] == "cascade"
    assert saved["goals"]["met"]["greedy_identical_everywhere"]
    cascade_vs_oracle = []
    for cell in {(r["workload"], r["concurrency"]) for r in rows}:
        # the oracle is the static with the most tokens/s of its cell, as recorded
        same = [r for r in rows if (r["workload"], r["concurrency"]) == cell]
        statics = {r["mode"]: r["tokens_per_s"] for r in same if r["mode"].startswith("static")}
        assert len(statics) == len(STATICS) and len(set(statics.values())) == len(STATICS), (cell, statics)
        best = max(statics, key=statics.get)
        plain = next(r["tokens_per_s"] for r in same if r["mode"] == "plain")
        for r in same:
            assert r["oracle"] == best, (cell, statics, r["oracle"])
            assert r["vs_oracle"] == pytest.approx(r["tokens_per_s"] / statics[best]), (cell, r)
            assert r["vs_plain"] == pytest.approx(r["tokens_per_s"] / plain), (cell, r)
        cascade_vs_oracle.append(next(r["vs_oracle"] for r in same if r["mode"] == "cascade"))
    assert saved["goals"]["cascade_vs_oracle_min"] == pytest.approx(min(cascade_vs_oracle))
    table = (tmp_path / "eval_smoke_engine.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "Goals:" in table
    for name in ("throughput", "cascade_choices", "verify_cost"):
        assert (tmp_path / f"eval_smoke_engine_{name}.png").read_bytes()[:4] == b"\x89PNG"
    with gzip.open(tmp_path / "eval_smoke_engine.iterations.json.gz", "rt") as f:
        logs = json.load(f)
    assert set(logs) == set(modes) and all(logs[m] for m in modes)
    assert all(len(it["rids"]) == it["batch"] for it in logs["cascade"])
