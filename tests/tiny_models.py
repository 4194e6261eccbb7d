"""Tiny randomly initialised real model classes for fast engine tests: a transformers Mixtral target
(or a Qwen3-MoE one) and an EAGLE-3 head for it. A small vocabulary makes random drafts hit often
enough to exercise accepted branches as well as rejected ones."""

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from sglang_cascade.drafters.eagle3 import Eagle3Config, Eagle3DraftHead

VOCAB = 48


def tiny_target(seed: int = 0, hidden_size: int = 64, intermediate_size: int = 32) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=1024, tie_word_embeddings=False,
                        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():   # sharper logits than the default init, so text is not uniform noise
        model.lm_head.weight.mul_(8)
    return model


def tiny_qwen3_moe_target(seed: int = 0, hidden_size: int = 256, moe_intermediate_size: int = 64,
                          num_experts: int = 8) -> Qwen3MoeForCausalLM:
    """A tiny random Qwen3-MoE (the family of Qwen3-30B-A3B): every layer sparse, top-2 of
    `num_experts`, renormalised routing as the released checkpoints, per-head q/k norms. head_dim is
    explicit (Qwen3's config defaults it to 128, not hidden / heads): 64 as SGLang's CPU kernels take."""
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=4 * moe_intermediate_size,
                         moe_intermediate_size=moe_intermediate_size, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=hidden_size // 4, num_experts=num_experts,
                         num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         max_position_embeddings=1024, tie_word_embeddings=False, use_sliding_window=False,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():   # sharper logits than the default init, as tiny_target
        model.lm_head.weight.mul_(8)
    return model


def tiny_head(target: MixtralForCausalLM, seed: int = 1) -> Eagle3DraftHead:
    torch.manual_seed(seed)
    cfg = Eagle3Config.for_target(target.config, draft_vocab_size=VOCAB - 8, intermediate_size=64,
                                  aux_layer_ids=[0, 1, 2])   # SGLang's default [1, 1, 0] repeats a layer at 4 layers
    head = Eagle3DraftHead(cfg).eval()
    head.set_vocab(torch.arange(8, VOCAB))
    return head


def trained_tiny_head(target: MixtralForCausalLM, steps: int = 80, seed: int = 1) -> Eagle3DraftHead:
    """A tiny head fitted (step 0 only) to the target's own greedy continuations, so that drafts are
    accepted often: enough to exercise long accepted paths in the lossless tests."""
    head = tiny_head(target, seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, VOCAB, (12, 4), generator=gen)
    with torch.no_grad():
        seqs = target.generate(prompts, max_new_tokens=28, do_sample=False, pad_token_id=0)
        out = target(seqs, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[k + 1] for k in head.config.aux_layer_ids], -1)
    labels = out.logits.argmax(-1)[:, 1:] - 8           # draft id = target id - 8 (see tiny_head)
    labels[labels < 0] = -100
    embeds = target.model.embed_tokens(seqs[:, 1:]).detach()
    positions = torch.arange(1, seqs.shape[1]).expand(seqs.shape[0], -1)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    from sglang_cascade.drafters.eagle3 import causal_attend
    for _ in range(steps):
        hidden = head.forward_hidden(embeds, head.fuse(aux[:, :-1]), positions, causal_attend)
        loss = torch.nn.functional.cross_entropy(head.logits(hidden).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()
