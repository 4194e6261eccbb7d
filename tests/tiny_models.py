"""Tiny randomly initialised real model classes for fast engine tests: a transformers Mixtral target
and an EAGLE-3 head for it. A small vocabulary makes random drafts hit often enough to exercise
accepted branches as well as rejected ones."""

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from drafters.eagle3 import Eagle3Config, Eagle3DraftHead

VOCAB = 48


def tiny_target(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=None,
                        bos_token_id=None, pad_token_id=None)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():   # sharper logits than the default init, so text is not uniform noise
        model.lm_head.weight.mul_(8)
    return model


def tiny_head(target: MixtralForCausalLM, seed: int = 1) -> Eagle3DraftHead:
    torch.manual_seed(seed)
    cfg = Eagle3Config.for_target(target.config, draft_vocab_size=VOCAB - 8, intermediate_size=64)
    head = Eagle3DraftHead(cfg).eval()
    head.set_vocab(torch.arange(8, VOCAB))
    return head
