"""The K=0 tax benchmark's arithmetic: ratios are taken within a round, then the median over rounds."""

import json

from evals.k0_tax import iteration_ms, summarise, table
from evals.targets import K0_MODE


def _row(r, mode, tok_s, tpot, iteration_ms=None):
    return {"round": r, "mode": mode, "workload": "code", "concurrency": 1, "tokens_per_s": tok_s,
            "tpot_median_ms": tpot, "iteration_ms_median": iteration_ms}


def test_ratios_within_rounds_then_median():
    rows = [_row(0, "plain", 10.0, 100.0), _row(0, K0_MODE, 9.0, 110.0),     # round 0: 0.9
            _row(1, "plain", 5.0, 200.0), _row(1, K0_MODE, 5.5, 180.0),      # round 1 (machine slower): 1.1
            _row(2, "plain", 8.0, 120.0), _row(2, K0_MODE, 7.6, 130.0)]      # round 2: 0.95
    (s,) = summarise(rows)
    assert s["mode"] == K0_MODE and [round(x, 3) for x in s["vs_plain_per_round"]] == [0.9, 1.1, 0.95]
    assert round(s["vs_plain_median"], 3) == 0.95
    assert s["plain_tokens_per_s"] == 8.0 and s["tokens_per_s"] == 7.6 and s["tpot_ms"] == 130.0
    meta = {"machine": "m", "commit": "c", "date": "d", "rounds": 3, "prompts": 8, "max_new_tokens": 48}
    assert f"| code | 1 | {K0_MODE} | 8.00 | 7.60 | 120.0 | 130.0 | - | 0.90, 1.10, 0.95 | **0.950** |" in table([s], meta)


def test_one_row_per_mode_held_at_plain():
    rows = [_row(0, "plain", 10.0, 100.0), _row(0, K0_MODE, 9.0, 110.0, 95.0), _row(0, "run", 8.0, 120.0, 99.0),
            _row(1, "plain", 10.0, 100.0), _row(1, K0_MODE, 9.0, 110.0, 97.0), _row(1, "run", 8.0, 120.0, 103.0)]
    assert [(s["mode"], s["vs_plain_median"], s["iteration_ms"]) for s in summarise(rows)] == \
        [(K0_MODE, 0.9, 96.0), ("run", 0.8, 101.0)]


def test_iteration_ms_reads_the_phase_from_the_log(tmp_path):
    log = tmp_path / "it.jsonl"
    log.write_text("\n".join(json.dumps({"t": t, "batch": b, "wall_s": w})
                             for t, b, w in [(1, 1, 0.5), (5, 1, 0.08), (6, 1, 0.09), (7, 2, 0.2), (8, 1, 0.1)]))
    assert iteration_ms(log, since=4, batch=1) == 90.0
    assert iteration_ms(tmp_path / "none.jsonl", since=0, batch=1) is None
