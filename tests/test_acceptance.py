"""Speculative sampling emits tokens distributed exactly as the target's."""

import torch
from scipy.stats import chisquare
from tiny_models import VOCAB

from sglang_cascade.controller import SpecConfig
from sglang_cascade.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from sglang_cascade.engine.acceptance import accept_greedy, accept_sampling, target_probs
from sglang_cascade.engine.tree import DraftTree

ALPHA = 1e-3


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against probabilities (cells with tiny expectations pooled)."""
    expected = probs * counts.sum()
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).double()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


def test_tree_sampling_is_lossless():
    """Root has three drafted children (one likely, one unlikely, one impossible); the likely child has
    a child of its own. First token ~ p_root; after an accepted child c, the next token ~ p_c."""
    vocab = 6
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, vocab, generator=gen) * 1.5, -1).double()
    probs[0, 3] = 0
    probs[0] /= probs[0].sum()
    likely = int(probs[0].argmax())
    tree = DraftTree([0, likely, (likely + 1) % vocab if (likely + 1) % vocab != 3 else 4, 3, 2],
                     [-1, 0, 0, 0, 1])
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(20000):
        path, bonus = accept_sampling(tree, probs, gen)
        emitted = [tree.tokens[i] for i in path[1:]] + [bonus]
        first[emitted[0]] += 1
        if path[1:2] == [1]:
            second[emitted[1]] += 1
    assert first[3] == 0
    assert _chi2_p(first, probs[0]) > ALPHA
    assert _chi2_p(second, probs[1]) > ALPHA


def test_greedy_acceptance_follows_argmax():
    logits = torch.full((4, 5), -1.0)
    logits[0, 2] = logits[1, 1] = logits[2, 4] = logits[3, 0] = 5.0
    tree = DraftTree([9, 3, 2, 4], [-1, 0, 0, 2])      # child 2 of the root is right, then 4 is right
    assert accept_greedy(tree, logits) == ([0, 2, 3], 0)


def test_top_k_top_p_processing():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert p[0, 2:].sum() == 0 and torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert p[0, 0] == 1.0


def test_engine_sampling_matches_target_distribution(tiny_pair):
    """Pairs (t1, t2) sampled by the speculative engine against the exact target joint distribution."""
    model, head = tiny_pair
    prompt = [3, 17, 5]
    engine = Engine(EngineConfig(mode="static", static_config=SpecConfig.parse("3x2x6"), max_batch=8,
                                 max_context=64), model=model, head=head)
    n = 600
    for i in range(n):
        engine.add_request(GenerationRequest(f"s{i}", prompt, SamplingParams(max_new_tokens=2, temperature=1.0,
                                                                             seed=i)))
    pairs = {}
    accepted = 0
    while engine.has_work():
        for o in engine.step():
            pairs.setdefault(o.rid, []).extend(o.new_token_ids)
            accepted += o.finished and o.meta["spec_accepted_drafts"]
    assert accepted > 0
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        seqs = torch.tensor([prompt + [t] for t in range(VOCAB)])
        p2 = torch.softmax(model(seqs).logits[:, -1].double(), -1)
    joint = (p1[:, None] * p2).flatten()
    counts = torch.zeros(VOCAB * VOCAB)
    for t1, t2 in pairs.values():
        counts[t1 * VOCAB + t2] += 1
    assert _chi2_p(counts, joint) > ALPHA
