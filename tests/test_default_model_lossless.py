"""On the embedded default MoE with its default head: 20 prompts of code, math, extraction and chat,
batched 8 at a time, produce the same greedy tokens with Cascade and static trees as with plain
decoding. Builds the default MoE on first use (a few minutes)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglang_cascade.controller import SpecConfig
from sglang_cascade.engine import Engine, EngineConfig
from sglang_cascade.engine.engine import default_target_path, load_head
from test_engine_lossless import generate
from sglang_cascade import workloads
from sglang_cascade.workloads import chat_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_models():
    path = default_target_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, load_head(None, model.config), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def prompts(default_models):
    tokenizer = default_models[2]
    return [chat_ids(tokenizer, p) for w in workloads.WORKLOADS for p in workloads.prompts(w, "heldout", 5)]


def _engine(models, **cfg):
    model, head, tokenizer = models
    return Engine(EngineConfig(max_batch=8, **cfg), model=model, head=head, tokenizer=tokenizer)


def test_twenty_prompts_identical_to_plain(default_models, prompts):
    assert len(prompts) == 20
    plain, _ = generate(_engine(default_models, mode="plain"), prompts, max_new_tokens=32)
    cascade, meta = generate(_engine(default_models, mode="cascade"), prompts, max_new_tokens=32)
    assert cascade == plain
    assert sum(m["spec_accepted_drafts"] for m in meta) > 0
    tree, _ = generate(_engine(default_models, mode="static", static_config=SpecConfig.parse("3x2x6")), prompts,
                       max_new_tokens=32)
    assert tree == plain
