"""The eval runner: its bookkeeping on synthetic requests (fast), the mirrored rounds on fake servers,
then end to end at the smoke size with real servers (one per mode) on 127.0.0.1, the embedded default
MoE and head, one mixed cell of every served workload.

The smoke run passes two statics to --smoke, so the oracle (the best of plain and every static of a
cell) is a real choice and a wrong pick shows."""

import contextlib
import gzip
import json

import pytest

from evals import precision, run_evals
from evals.serving import ENDPOINTS, RequestResult
from sglang_cascade import workloads
from sglang_cascade.engine.engine import DEFAULT_HEAD_DIR, default_target_path
from sglang_cascade.target_digest import DIGEST_FILE, HEAD_KEY, target_digest

STATICS = ["1x1x2", "3x1x4"]
CELL = ("mixed", 1)
N = 12  # synthetic requests per round: enough to resolve


def _served(speeds: dict[str, float], rounds=2, ids=None, errors=()):
    """(mode, round, *CELL) -> results: N requests of 100 tokens at the mode's tokens/s."""
    out = {}
    for mode, speed in speeds.items():
        for r in range(rounds):
            out[(mode, r, *CELL)] = [
                RequestResult(f"q{i}", "code", "chat", output_ids=(ids or {}).get(mode, {}).get(i, [1, 2, i]),
                              output_tokens=100, latency_s=100 / (speed * (1 + 0.001 * i)),
                              error="HTTP 500: boom" if (mode, i) in errors else None) for i in range(N)]
    return out


def _rows(served):
    return [{"mode": m, "round": r, "workload": w, "concurrency": c, "format": "chat",
             "errors": sum(x.error is not None for x in res), **run_evals.summarise(res, 10.0, [])}
            for (m, r, w, c), res in served.items()]


def _annotate(speeds, **kw):
    served = _served(speeds, **kw)
    rows = _rows(served)
    cells, goals = run_evals.annotate(rows, served, 2)
    return rows, {c["mode"]: c for c in cells}, goals


def test_oracle_is_best_of_plain_and_statics_with_intervals_and_verdicts():
    # plain fastest: speculating at all was the mistake, so the oracle is plain; Cascade 5% below: missed
    _, cells, goals = _annotate({"plain": 10.0, "static 1x1x2": 8.0, "static 3x1x4": 9.0, "cascade": 9.5})
    assert {c["vs_oracle"]["against"] for c in cells.values()} == {"plain"}
    c = cells["cascade"]["vs_oracle"]
    assert c["estimate"] == pytest.approx(0.95) and c["low"] <= 0.95 <= c["high"] and c["verdict"] == "missed"
    assert goals["vs_oracle"]["verdict"] == "missed" and goals["vs_plain"]["verdict"] == "missed"
    # a static faster than plain is the oracle; Cascade within 1% of it: met
    _, cells, goals = _annotate({"plain": 10.0, "static 1x1x2": 12.0, "static 3x1x4": 11.0, "cascade": 11.9})
    assert {c["vs_oracle"]["against"] for c in cells.values()} == {"static 1x1x2"}
    assert cells["cascade"]["vs_oracle"]["estimate"] == pytest.approx(11.9 / 12.0)
    assert goals["vs_oracle"]["verdict"] == "met" and goals["vs_plain"]["cells"]["mixed/1"]["verdict"] == "met"
    text = run_evals.goals_text(goals)
    assert "best of no speculation and every static" in text and "**met**" in text
    assert "0.992 [" in run_evals.table(list(cells.values())), run_evals.table(list(cells.values()))


def test_wide_intervals_are_unresolved():
    served = _served({"plain": 10.0, "static 3x1x4": 9.0, "cascade": 10.0})
    for i, res in enumerate(served[("cascade", 0, *CELL)]):   # Cascade's speed-up varies +-30% by request
        res.latency_s *= 0.7 if i % 2 else 1.3
    cells, goals = run_evals.annotate(_rows(served), served, 2)
    cascade = next(c for c in cells if c["mode"] == "cascade")
    assert cascade["vs_plain"]["high"] - cascade["vs_plain"]["low"] > 0.06
    assert goals["vs_plain"]["verdict"] == "unresolved" and "**unresolved**" in run_evals.goals_text(goals)


def test_identity_compares_token_ids_per_request():
    # one request's ids differ (say, two ids that decode to the same text); an errored request has none
    rows, cells, goals = _annotate({"plain": 10.0, "static 1x1x2": 10.0, "static 3x1x4": 10.0, "cascade": 10.0},
                                   ids={"static 1x1x2": {3: [1, 2, 4]}}, errors={("static 3x1x4", 0)})
    assert {m: c["identical_to_plain"] for m, c in cells.items()} == {
        "plain": True, "static 1x1x2": False, "static 3x1x4": False, "cascade": True}
    assert not goals["greedy_identical_everywhere"] and goals["vs_plain"]["verdict"] == "missed"  # the error
    _, _, goals = _annotate({"plain": 10.0, "static 1x1x2": 10.0, "cascade": 10.0}, ids={"cascade": {3: [9]}})
    assert not goals["greedy_identical_everywhere"] and goals["vs_plain"]["verdict"] == "met"


def test_errors_are_counted_and_fail_the_goals():
    ok = RequestResult("r0", "code", "completion", "ab", [1, 2], output_tokens=2, ttft_s=0.1, latency_s=0.3)
    row = run_evals.summarise([ok, RequestResult("r1", "code", error="HTTP 500: boom")], 1.0, [])
    assert row["requests"] == 2 and row["errors"] == 1 and row["error_messages"] == ["HTTP 500: boom"]
    assert row["tokens"] == 2 and row["output_tokens"]["median"] == 2
    _, cells, goals = _annotate({"plain": 10.0, "static 1x1x2": 9.0, "cascade": 20.0}, errors={("cascade", 0)})
    assert cells["cascade"]["errors"] == 2 and not goals["no_errors"]
    assert {goals[g]["verdict"] for g in ("vs_plain", "vs_oracle")} == {"missed"}
    assert "errored requests: SOME" in run_evals.goals_text(goals)
    table = run_evals.table(list(cells.values())).splitlines()
    assert table[0].endswith("| errors |") and [ln.rsplit("|", 2)[1].strip() for ln in table[2:]] == ["0", "0", "2"]


def test_cells_take_distinct_held_out_prompts_in_their_formats():
    phases = run_evals.request_specs(["code", "mixed"], [1, 4], 10, 256, seed=0)
    texts = [s.text for specs in phases.values() for s in specs]
    assert len(texts) == len(set(texts)) == 40
    assert {s.format for s in phases[("code", 1)]} == {"completion"}
    mixed = phases[("mixed", 4)]
    assert sorted(s.workload for s in mixed) == sorted(run_evals.SINGLE * 2)
    assert all(s.format == workloads.SERVED[s.workload][1] and s.rid.startswith(s.workload + ":") for s in mixed)
    assert all(s.max_new_tokens == 256 for s in mixed)
    assert [s.workload for s in mixed] != [w for w in run_evals.SINGLE for _ in range(2)]   # shuffled


@pytest.mark.parametrize("side_by_side", [True, False])
def test_rounds_are_mirrored_on_fresh_servers(tmp_path, monkeypatch, side_by_side):
    events = []

    @contextlib.contextmanager
    def server(command, port, log, env):
        events.append(("start", command[0]))
        yield command[0]
        events.append(("stop", command[0]))

    def load(url, specs, conc):
        if specs[0].rid != "warmup":
            events.append(("cell", url, specs[0].workload))
        return [RequestResult(s.rid, s.workload, s.format, output_ids=[1], output_tokens=1, latency_s=1.0)
                for s in specs], 1.0

    class Target:
        env, name = {}, "fake"

        def command(self, flags, port, log):
            return [flags[0]]

    Target.side_by_side = side_by_side
    monkeypatch.setattr(run_evals, "running_server", server)
    monkeypatch.setattr(run_evals, "load", load)
    phases = run_evals.request_specs(["code", "chat"], [1], 1, 4, seed=0)
    modes = [("plain", ["A"]), ("cascade", ["B"])]
    _, rows, served, _ = run_evals.run_all(Target(), modes, tmp_path, phases, rounds=2)
    # side by side, each cell goes through the round's servers in turn; else each server through every cell
    order = (["plain code", "cascade code", "plain chat", "cascade chat",
              "cascade code", "plain code", "cascade chat", "plain chat"] if side_by_side else
             ["plain code", "plain chat", "cascade code", "cascade chat",
              "cascade code", "cascade chat", "plain code", "plain chat"])
    assert [f"{r['mode']} {r['workload']}" for r in rows] == order and [r["round"] for r in rows] == [0] * 4 + [1] * 4
    assert [e for e in events if e[0] == "start"] == [("start", "A"), ("start", "B"), ("start", "B"), ("start", "A")]
    assert len(served) == 8


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
    served = {}   # every request's result, as the runner hands them to annotate()
    annotate = run_evals.annotate
    monkeypatch.setattr(run_evals, "annotate", lambda rows, res, *a: served.update(res) or annotate(rows, res, *a))
    payload = run_evals.main(["--smoke", "--static", ",".join(STATICS), "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_smoke_engine.json").read_text())
    assert saved["goals"] == payload["goals"]
    for key in ("machine", "commit", "date", "launch", "args", "results", "cells", "requests"):
        assert saved[key]
    assert saved["digests"] == {"target_digest": target_digest(default_target_path()),
                                "head_digest": target_digest(DEFAULT_HEAD_DIR),
                                "head_trained_on": target_digest(default_target_path()),
                                "head_matches_target": True}
    modes = ["plain", *(f"static {s}" for s in STATICS), "sglang-adaptive", "cascade"]
    assert list(saved["launch"]) == modes and "--mode adaptive" in saved["launch"]["sglang-adaptive"]
    # requests as users send them: chat through the OpenAI endpoint, code as a raw completion
    assert saved["endpoints"] == {"chat": "/v1/chat/completions", "completion": "/generate"} == ENDPOINTS
    assert {(q["served_workload"], q["format"]) for q in saved["requests"]} == {
        (w, f) for w, (_, f) in workloads.SERVED.items()}
    # every answer's token ids came from the server (the client errs a request whose ids are missing)
    assert not any(q["error"] for q in saved["requests"])
    rows = saved["results"]
    assert {(r["mode"], r["workload"], r["round"]) for r in rows} == {(m, "mixed", 0) for m in modes}
    plain = {x.rid: x.output_ids for x in served[("plain", 0, *CELL)]}
    top_k = json.loads((default_target_path() / "config.json").read_text())["num_experts_per_tok"]
    for r in rows:
        assert r["errors"] == 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
        assert r["format"] == "chat+completion" and r["output_tokens"]["median"] == 8, r
        mine = served[(r["mode"], 0, *CELL)]
        assert all(x.output_ids and all(isinstance(t, int) for t in x.output_ids) for x in mine)
        assert all(len(x.output_ids) == x.output_tokens for x in mine if x.format == "completion")  # the server's
        assert r["identical_to_plain"] is ({x.rid: x.output_ids for x in mine} == plain), r["mode"]
        assert r["identical_to_plain"], f"{r['mode']}: greedy token ids differ from plain"
        assert r["iterations"] > 0 and r["distinct_experts_per_verify"] >= top_k   # a token's own experts
        assert (r["share_speculating"] > 0) == (r["mode"] != "plain") or r["mode"] == "cascade"
        # the speculative figures, from the chat stream's sglext and /generate's meta_info (plain: 1 a step)
        assert r["accept_length"] >= 1 and (r["accept_length"] > 1 or r["mode"] in ("plain", "cascade")), r
    goals = saved["goals"]
    assert goals["greedy_identical_everywhere"] and goals["no_errors"]
    cells = {c["mode"]: c for c in saved["cells"]}
    candidates = {m: c["tokens_per_s"] for m, c in cells.items() if m == "plain" or m.startswith("static")}
    for c in cells.values():
        for key in ("vs_plain", "vs_oracle"):
            iv = c[key]
            assert iv["low"] <= iv["estimate"] <= iv["high"] and iv["against"] in candidates, (key, c)
        # five requests a round cannot resolve a 3% goal, whatever the interval
        assert c["vs_oracle"]["verdict"] == "unresolved" and set(c["per_workload"] if c["mode"] != "plain" else
                                                                  run_evals.SINGLE) == set(run_evals.SINGLE)
    assert {goals[g]["verdict"] for g in run_evals.GOALS} == {"unresolved"}
    assert goals["vs_adaptive"]["cells"]["mixed/1"]["against"] == "sglang-adaptive"
    table = (tmp_path / "eval_smoke_engine.md").read_text()
    assert table.startswith(run_evals.digest_text(saved["digests"])) and "trained on this target" in table
    assert table.count("\n| mixed | chat+completion | 1 |") == len(modes) and "**unresolved**" in table
    assert "errored requests: none" in table and "per workload" in table
    for name in ("throughput", "vs_plain", "cascade_choices", "verify_cost"):
        assert (tmp_path / f"eval_smoke_engine_{name}.png").read_bytes()[:4] == b"\x89PNG"
    with gzip.open(tmp_path / "eval_smoke_engine.iterations.json.gz", "rt") as f:
        logs = json.load(f)
    assert set(logs) == set(modes) and all(logs[m] for m in modes)
    assert all(len(it["rids"]) == it["batch"] for it in logs["cascade"])
    assert precision.MIN_REQUESTS > len(plain)
