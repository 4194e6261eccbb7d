"""The K=0 tax benchmark's arithmetic: ratios paired by request within a round, intervals, verdicts, and
the plugin's iteration times read per cell."""

import json

import pytest

from evals.k0_tax import PLAIN, bursts, iteration_ms, summarise, table
from evals.run_evals import read_log
from evals.targets import K0_MODE

CELL = ("chat", 1)
MODES = [(PLAIN, []), (K0_MODE, [])]


def _rounds(per_request_s: list[list[float]]) -> list[dict]:
    """One round per list: request i served 100 tokens in that many seconds."""
    return [{f"r{i}": (100, s) for i, s in enumerate(rnd)} for rnd in per_request_s]


def _summary(plain, mode, errors=0, iterations=()):
    served = {(CELL, PLAIN): _rounds(plain), (CELL, K0_MODE): _rounds(mode)}
    extra = {(CELL, PLAIN): {"errors": 0, "iteration_ms": []},
             (CELL, K0_MODE): {"errors": errors, "iteration_ms": list(iterations)}}
    (s,) = summarise(served, extra, [CELL], MODES)
    return s


def test_ratio_within_rounds_survives_a_drifting_machine():
    """Round 1 runs at half the speed of round 0; the mode is 2% slower than plain in both."""
    plain = [[10.0 + 0.1 * i for i in range(12)], [20.0 + 0.2 * i for i in range(12)]]
    mode = [[s * 1.02 for s in rnd] for rnd in plain]
    s = _summary(plain, mode, iterations=[90.0, 95.0, 100.0])
    assert s["vs_plain"] == pytest.approx(1 / 1.02) and s["per_round"] == pytest.approx([1 / 1.02] * 2)
    assert s["low"] == pytest.approx(1 / 1.02) == pytest.approx(s["high"])
    assert s["verdict"] == "met" and s["iteration_ms_median"] == 95.0
    meta = {"machine": "m", "cpu_kernels": "k", "commit": "c", "date": "d", "command": "cmd", "rounds": 2,
            "requests": 12, "max_new_tokens": 96}
    assert f"| chat | 1 | {K0_MODE} | " in table([s], meta) and "| **0.980** | 0.980-0.980 |" in table([s], meta)


def test_verdicts_missed_unresolved_and_errors():
    plain = [[10.0] * 12, [10.0] * 12]
    assert _summary(plain, [[11.0] * 12] * 2)["verdict"] == "missed"             # 0.909, every request alike
    noisy = [[10.0 * (0.7 if i % 2 else 1.3) for i in range(12)]] * 2              # +-30% per request
    assert _summary(plain, noisy)["verdict"] == "unresolved"
    assert _summary(plain, plain, errors=1)["verdict"] == "missed"               # an error fails the goal


def test_bursts_hold_each_request_once_in_its_served_format():
    groups = bursts("chat", 4, 12, 96, 0)
    assert [len(g) for g in groups] == [4, 4, 4]
    assert len({s.rid for g in groups for s in g}) == 12 and {s.format for g in groups for s in g} == {"chat"}
    assert {s.max_new_tokens for g in groups for s in g} == {96}
    assert {s.format for g in bursts("code", 1, 2, 96, 0) for s in g} == {"completion"}


def test_iteration_ms_reads_the_cells_batch_size(tmp_path):
    log = tmp_path / "it.jsonl"
    log.write_text("\n".join(json.dumps({"t": t, "batch": b, "wall_s": w})
                             for t, b, w in [(1, 1, 0.5), (5, 1, 0.08), (7, 2, 0.2)]))
    assert iteration_ms(read_log(log), batch=1) == pytest.approx([500.0, 80.0])
    assert iteration_ms(read_log(log)[1:], batch=2) == pytest.approx([200.0])
    assert read_log(tmp_path / "none.jsonl") == []
