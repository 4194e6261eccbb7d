"""The eval runner: its bookkeeping on synthetic rows (fast), then end to end at the smoke size with
real servers (one per mode) on 127.0.0.1, the embedded default MoE and head, every workload.

The smoke run passes two statics to --smoke, so the oracle (the best of plain and every static of a
cell) is a real choice and a wrong pick shows."""

import gzip
import json

import pytest

from evals import run_evals
from evals.serving import RequestResult
from sglang_cascade.engine.engine import DEFAULT_HEAD_DIR, default_target_path
from sglang_cascade.target_digest import DIGEST_FILE, HEAD_KEY, target_digest

STATICS = ["1x1x2", "3x1x4"]
WORKLOADS = ("code", "math", "extraction", "chat", "mixed")


def _row(mode, tps, errors=0, workload="code"):
    return {"mode": mode, "workload": workload, "concurrency": 1, "tokens_per_s": tps, "errors": errors,
            **dict.fromkeys(("tpot_ms_median", "tpot_ms_p90", "accept_length", "share_speculating",
                             "distinct_experts_per_verify"))}


def _ids(modes, workload="code", **override):
    return {m: {(workload, 1): {"r0": [1, 2, 3], "r1": [4, 5], **override.get(m.replace(" ", "_"), {})}}
            for m in modes}


def test_oracle_is_best_of_plain_and_statics():
    # plain fastest: speculating at all was the mistake, so the oracle is plain
    rows = [_row("plain", 10.0), _row("static 1x1x2", 8.0), _row("static 3x1x4", 9.0), _row("cascade", 9.5)]
    goals = run_evals.annotate(rows, _ids([r["mode"] for r in rows]))
    assert {r["oracle"] for r in rows} == {"plain"}
    assert goals["cascade_vs_oracle_min"] == pytest.approx(0.95) and not goals["met"]["within_3pct_of_oracle"]
    # a static faster than plain is the oracle
    rows = [_row("plain", 10.0), _row("static 1x1x2", 12.0), _row("static 3x1x4", 11.0), _row("cascade", 11.9)]
    goals = run_evals.annotate(rows, _ids([r["mode"] for r in rows]))
    assert {r["oracle"] for r in rows} == {"static 1x1x2"}
    assert goals["cascade_vs_oracle_min"] == pytest.approx(11.9 / 12.0) and goals["met"]["within_3pct_of_oracle"]
    assert "best of no speculation and every static" in run_evals.goals_text(goals)


def test_identity_compares_token_ids_per_request():
    modes = ["plain", "static 1x1x2", "static 3x1x4", "cascade"]
    rows = [_row(m, 10.0) for m in modes]
    # one request's ids differ (say, two ids that decode to the same text); an errored request has None
    ids = _ids(modes, static_1x1x2={"r1": [4, 6]}, static_3x1x4={"r0": None})
    goals = run_evals.annotate(rows, ids)
    assert {r["mode"]: r["identical_to_plain"] for r in rows} == {
        "plain": True, "static 1x1x2": False, "static 3x1x4": False, "cascade": True}
    assert not goals["met"]["greedy_identical_everywhere"]


def test_errors_are_counted_and_fail_the_goals():
    ok = RequestResult("r0", "code", "ab", [1, 2], output_tokens=2, ttft_s=0.1, latency_s=0.3)
    row = run_evals.summarise([ok, RequestResult("r1", "code", error="HTTP 500: boom")], 1.0, [])
    assert row["requests"] == 2 and row["errors"] == 1 and row["error_messages"] == ["HTTP 500: boom"]
    assert row["tokens"] == 2
    modes = ["plain", "static 1x1x2", "cascade"]
    rows = [_row("plain", 10.0), _row("static 1x1x2", 9.0), _row("cascade", 20.0, errors=1)]
    goals = run_evals.annotate(rows, _ids(modes))
    assert goals["met"]["no_errors"] is False and not any(goals["met"].values()), goals["met"]
    assert "errored requests: SOME" in run_evals.goals_text(goals)
    assert run_evals.table(rows).splitlines()[0].endswith("| errors |")
    assert [line.rsplit("|", 2)[1].strip() for line in run_evals.table(rows).splitlines()[2:]] == ["0", "0", "1"]


def test_digests_report_a_mismatched_head(tmp_path):
    target, head = tmp_path / "target", tmp_path / "head"
    target.mkdir(), head.mkdir()
    (target / DIGEST_FILE).write_text(json.dumps({"digest": "aaaaaaaaaaaaaaaa"}))
    (head / "config.json").write_text(json.dumps({HEAD_KEY: "bbbbbbbbbbbbbbbb"}))

    class Target:
        model, draft = str(target), str(head)

    pair = run_evals.digests(Target)
    assert pair == {"target_digest": "aaaaaaaaaaaaaaaa", "head_digest": target_digest(head),
                    "head_trained_on": "bbbbbbbbbbbbbbbb", "head_matches_target": False}
    assert pair["head_digest"] is not None
    assert run_evals.digest_text(pair).startswith("MISMATCH")


@pytest.mark.slow
def test_smoke_report(tmp_path, monkeypatch):
    served = {}   # the token ids every mode's server returned, as the runner hands them to annotate()
    annotate = run_evals.annotate
    monkeypatch.setattr(run_evals, "annotate", lambda rows, ids: served.update(ids) or annotate(rows, ids))
    payload = run_evals.main(["--smoke", "--static", ",".join(STATICS), "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_smoke_engine.json").read_text())
    assert saved["goals"] == payload["goals"]
    for key in ("machine", "commit", "date", "launch", "args", "results"):
        assert saved[key]
    assert saved["digests"] == {"target_digest": target_digest(default_target_path()),
                                "head_digest": target_digest(DEFAULT_HEAD_DIR),
                                "head_trained_on": target_digest(default_target_path()),
                                "head_matches_target": True}
    modes = ["plain", *(f"static {s}" for s in STATICS), "sglang-adaptive", "cascade"]
    assert list(saved["launch"]) == modes
    assert "--mode adaptive" in saved["launch"]["sglang-adaptive"]
    rows = saved["results"]
    assert {(r["mode"], r["workload"]) for r in rows} == {(m, w) for m in modes for w in WORKLOADS}
    for r in rows:
        assert r["errors"] == 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
        cell = (r["workload"], r["concurrency"])
        mine, plain = served[r["mode"]][cell], served["plain"][cell]
        assert sum(map(len, mine.values())) == r["tokens"], (r, mine)  # ids of every request, as counted
        assert all(isinstance(t, int) for ids in mine.values() for t in ids)
        assert r["identical_to_plain"] is (mine == plain), (r["mode"], cell, mine, plain)
        assert r["identical_to_plain"], f"{r['mode']} {r['workload']}: greedy token ids differ from plain"
        assert r["iterations"] > 0 and r["distinct_experts_per_verify"] >= 4.0
        speculated = r["share_speculating"] > 0
        assert speculated == (r["mode"] != "plain") or r["mode"] == "cascade"
    assert saved["goals"]["met"]["greedy_identical_everywhere"] and saved["goals"]["met"]["no_errors"]
    cascade_vs_oracle = []
    for cell in {(r["workload"], r["concurrency"]) for r in rows}:
        # the oracle is the mode with the most tokens/s among plain and the statics of its cell, as recorded
        same = {r["mode"]: r for r in rows if (r["workload"], r["concurrency"]) == cell}
        candidates = {m: r["tokens_per_s"] for m, r in same.items() if m == "plain" or m.startswith("static")}
        assert len(candidates) == 1 + len(STATICS) and len(set(candidates.values())) == len(candidates), cell
        best = max(candidates, key=candidates.get)
        for r in same.values():
            assert r["oracle"] == best, (cell, candidates, r["oracle"])
            assert r["vs_oracle"] == pytest.approx(r["tokens_per_s"] / candidates[best]), (cell, r)
            assert r["vs_plain"] == pytest.approx(r["tokens_per_s"] / candidates["plain"]), (cell, r)
        cascade_vs_oracle.append(same["cascade"]["vs_oracle"])
    assert saved["goals"]["cascade_vs_oracle_min"] == pytest.approx(min(cascade_vs_oracle))
    table = (tmp_path / "eval_smoke_engine.md").read_text()
    assert table.startswith(run_evals.digest_text(saved["digests"])) and "trained on this target" in table
    assert table.count("\n| ") == 1 + len(rows) and "Goals:" in table and "errored requests: none" in table
    for name in ("throughput", "cascade_choices", "verify_cost"):
        assert (tmp_path / f"eval_smoke_engine_{name}.png").read_bytes()[:4] == b"\x89PNG"
    with gzip.open(tmp_path / "eval_smoke_engine.iterations.json.gz", "rt") as f:
        logs = json.load(f)
    assert set(logs) == set(modes) and all(logs[m] for m in modes)
    assert all(len(it["rids"]) == it["batch"] for it in logs["cascade"])
