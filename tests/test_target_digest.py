"""A head records the target it was trained on; the engine and the plugin's launcher compare it with
the target they are given (real tiny transformers and EAGLE-3 checkpoints on disk)."""

import json

import pytest

from sglang_cascade import target_digest as td
from tiny_models import tiny_head, tiny_target


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target folder, head folder trained on it, head folder trained on another target)."""
    root = tmp_path_factory.mktemp("pair")
    target = tiny_target()
    target.save_pretrained(root / "target")
    digest = td.record_digest(root / "target")
    for name, recorded in (("head", digest), ("other-head", "0123456789abcdef")):
        tiny_head(target).save_pretrained(root / name)
        td.record_head_target(root / name, recorded)
    return root / "target", root / "head", root / "other-head"


def test_digest_covers_config_and_weights(pair, tmp_path):
    target = pair[0]
    digest = td.compute_digest(target)
    assert td.target_digest(target) == digest and len(digest) == 16
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("config.json", "model.safetensors"):
        (copy / f).write_bytes((target / f).read_bytes())
    assert td.compute_digest(copy) == digest                      # where it lives does not count
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert td.compute_digest(copy) != digest                      # one bit of a weight does


def test_matching_pair_says_so(pair):
    assert "matches" in td.check_pair(pair[0], pair[1], strict=True)


def test_mismatch_warns_with_both_digests_and_the_fix(pair):
    line = td.check_pair(pair[0], pair[2])
    assert line.startswith("warning:") and "0123456789abcdef" in line and td.target_digest(pair[0]) in line
    assert "build_default_moe.py --force" in line and "sglang_cascade.training.train_eagle3" in line


def test_mismatch_refused_when_strict(pair):
    with pytest.raises(td.TargetMismatch, match="--strict-target-hash"):
        td.check_pair(pair[0], pair[2], strict=True)


def test_unrecorded_sides(pair, tmp_path, monkeypatch):
    head = tmp_path / "head"
    tiny_head(tiny_target()).save_pretrained(head)               # a head from elsewhere: no record
    assert td.check_pair(pair[0], head, strict=True).startswith("target digest not checked")
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({}))
    monkeypatch.setattr(td, "MAX_HASHED_BYTES", -1)               # a folder too large to hash at load
    assert td.target_digest(big) is None
    assert "not checked" in td.check_pair(big, pair[2], strict=True)


def test_engine_refuses_a_mismatched_pair_before_loading_when_strict(pair, capsys):
    from sglang_cascade.engine import Engine, EngineConfig

    with pytest.raises(td.TargetMismatch):
        Engine(EngineConfig(target_path=str(pair[0]), draft_path=str(pair[2]), strict_target_hash=True))
    # the tiny target has no tokenizer files, and the engine only keeps the one it is given
    engine = Engine(EngineConfig(target_path=str(pair[0]), draft_path=str(pair[2]), max_batch=1, max_context=64),
                    tokenizer="no tokenizer")
    assert engine.head is not None
    assert "warning: the draft head" in capsys.readouterr().err


def test_plugin_launcher_refuses_a_mismatched_pair_when_strict(pair, capsys):
    """SGLang's launcher hook (argv_hook) checks before SGLang parses its flags or loads a model."""
    pytest.importorskip("sglang")
    from sglang_cascade.plugin.argv_hook import prepare_server_args_hook

    called = []
    argv = ["--model-path", str(pair[0]), "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path",
            str(pair[2]), "--device", "cpu", "--cascade", "--cascade-strict-target-hash"]
    with pytest.raises(SystemExit) as exit_info:
        prepare_server_args_hook(lambda *a, **k: called.append(a), argv)
    assert exit_info.value.code == 2 and not called
    assert "--cascade-strict-target-hash" in capsys.readouterr().err
