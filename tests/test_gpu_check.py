"""evals/gpu_check.py's CPU smoke run (--device cpu --quick), in-process: every part runs, the JSON has
the structure the GPU run will have, and a planted error (a rewrite that leaves cut rows their
experts) fails part 3, so that check can fail at all. Runs on the CPU only; no GPU claim here."""

import json

from evals import gpu_check
from sglang_cascade.plugin.pruned_experts import PrunedExperts


def test_cpu_smoke_run_writes_every_part(tmp_path):
    payload = gpu_check.main(["--device", "cpu", "--quick", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().startswith("GPU check on CPU")
    assert (tmp_path / "gpu_check_moe_bench.json").is_file()
    assert saved["ok"] == payload["ok"]
    for key in ("machine", "commit", "date", "device", "torch", "command", "parts"):
        assert saved[key], key
    assert list(saved["parts"]) == list(gpu_check.PARTS)
    assert all(p["status"] == "ok" for p in saved["parts"].values()), \
        {n: p.get("error") or p.get("failures") or p.get("failed_checks") for n, p in saved["parts"].items()}
    assert saved["ok"] and not saved["failed_parts"]

    bench = saved["parts"]["moe_bench"]
    assert bench["rows"] and all(r["ms"] > 0 and r["bytes_moved"] > 0 for r in bench["rows"])
    assert all(r["predicted_ms"] is None for r in bench["rows"])          # no HBM figure for a CPU

    engine = saved["parts"]["engine"]
    assert engine["training"]["train_steps"] > 0
    torch_backend = engine["backends"]["torch"]
    assert torch_backend["near_tie_bound"] == 0.0     # the CPU path is batch-invariant float32
    modes = torch_backend["modes"]
    assert list(modes) == ["plain", "plain_batched", "static chain 3x1x4", "static tree 4x2x8", "cascade"]
    for name, m in modes.items():
        assert m["tokens"] > 0 and m["tokens_per_s"] > 0, name
    for name in ("static chain 3x1x4", "static tree 4x2x8", "cascade"):
        assert modes[name]["ok"] and modes[name]["identical_to_plain"] == gpu_check.CPU_SIZES.eval_prompts, name
    assert modes["static chain 3x1x4"]["accepted_drafts"] > 0          # the trained head's drafts are accepted

    checks = saved["parts"]["pruned_experts"]["checks"]
    assert all(checks.values()) and "imports_without_sglang" in checks
    assert saved["parts"]["pruned_experts"]["graphs"] == "skipped: CUDA only"


def test_planted_error_fails_part_3(tmp_path, monkeypatch):
    monkeypatch.setattr(PrunedExperts, "rewrite", lambda self, layer_id, topk_output: topk_output)
    payload = gpu_check.main(["--device", "cpu", "--quick", "--parts", "pruned_experts",
                              "--results-dir", str(tmp_path)])
    part = payload["parts"]["pruned_experts"]
    assert not payload["ok"] and payload["failed_parts"] == ["pruned_experts"]
    assert part["status"] == "failed"
    assert {"convention", "cut_rows_load_no_experts", "cut_rows_output_zero"} <= set(part["failed_checks"])
    assert part["checks"]["kept_rows_output_equal"]          # kept rows are still right: only the saving is lost
