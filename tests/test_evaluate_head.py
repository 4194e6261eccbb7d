"""sglang_cascade.training.evaluate_head end to end at toy size: a Qwen3-MoE folder, a head trained on it by the real
pipeline, and the served-traffic report (every served workload in its request format, per position
and per verify)."""

from __future__ import annotations

import json

import pytest

from sglang_cascade import workloads
from test_eagle3_head import tiny_qwen3_moe_folder
from sglang_cascade.training import evaluate_head, train_eagle3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate_head")
    target = tiny_qwen3_moe_folder(tmp / "qwen3moe")
    run = {"workloads": ["chat"], "n_train": 2, "n_heldout": 1, "max_new_tokens": 8, "gen_batch_size": 2,
           "draft_vocab_size": 32, "intermediate_size": 32, "aux_layer_ids": [0, 2, 4], "ttt_steps": 2,
           "eval_steps": 2, "batch_size": 2, "train_steps": 2, "warmup_steps": 1, "save_every": 1, "threads": 1}
    (tmp / "run.json").write_text(json.dumps(run))
    train_eagle3.main(["--target", str(target), "--out", str(tmp / "head"), "--config", str(tmp / "run.json"),
                       "--work", str(tmp / "work"), "--device", "cpu"])
    return target, tmp / "head"


def test_every_served_workload_is_scored_in_its_format(pair):
    target, head = pair
    result = evaluate_head.main(["--target", str(target), "--head", str(head), "--prompts", "2",
                                 "--new-tokens", "12", "--steps", "3", "--threads", "1"])
    rows = result["workloads"]
    assert {name: r["format"] for name, r in rows.items()} == {n: form for n, (_, form) in workloads.SERVED.items()}
    for r in rows.values():
        assert len(r["tokens_per_verify"]) == 3 and r["positions"] > 0
        assert all(1 <= x <= s + 2 for s, x in enumerate(r["tokens_per_verify"]))   # s + 1 drafts + the bonus
    assert json.loads((head / "acceptance.json").read_text())["workloads"] == rows
    table = (head / "acceptance.md").read_text()
    assert "per verify" in table and all(f"| {name} |" in table for name in rows)


def test_a_folder_without_a_head_is_a_clear_error(pair, tmp_path, capsys):
    target, _ = pair
    with pytest.raises(SystemExit):
        evaluate_head.main(["--target", str(target), "--head", str(tmp_path)])
    assert "no config.json there" in capsys.readouterr().err
