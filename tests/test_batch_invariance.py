"""The arithmetic properties exact greedy losslessness rests on, checked on this machine."""

import torch

from sglang_cascade.engine.batch_invariant import linear
from sglang_cascade.engine.target import Segment, TargetModel
from sglang_cascade.engine.tree import DraftTree


def test_linear_rows_do_not_depend_on_batch():
    torch.manual_seed(0)
    for out_f, in_f in [(64, 64), (96, 576), (576, 96), (49152, 576)]:
        w, x = torch.randn(out_f, in_f), torch.randn(13, in_f)
        full = linear(x, w)
        for m in range(1, 13):
            assert torch.equal(linear(x[:m], w), full[:m]), (out_f, in_f, m)
        for i in range(13):
            assert torch.equal(linear(x[i:i + 1], w)[0], full[i]), (out_f, in_f, i)


def _segment(cache, tree):
    return Segment(cache, torch.tensor(tree.tokens), torch.tensor(tree.depths()), tree.ancestor_mask(),
                   torch.arange(len(tree)))


def _prefilled(target, tokens):
    cache = target.new_cache(64)
    target.forward([_segment(cache, DraftTree.chain(tokens))])
    cache.cached = len(tokens)
    return cache


def test_forward_matches_transformers(tiny_pair):
    model, _ = tiny_pair
    target = TargetModel(model, 64)
    ids = torch.arange(3, 15)
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    got = target.forward([_segment(target.new_cache(64), DraftTree.chain(ids.tolist()))]).logits[0]
    assert torch.allclose(got, ref, atol=1e-5)


def test_tree_verify_is_bit_identical_to_plain_decoding(tiny_pair):
    model, _ = tiny_pair
    target = TargetModel(model, 64, [0, 2])
    prompt, cont = [5, 9, 13, 2, 7], [11, 4, 30, 8, 21]
    plain_cache = _prefilled(target, prompt)
    plain = []
    for tok in cont:
        plain.append(target.forward([_segment(plain_cache, DraftTree.root_only(tok))]).logits[0][0])
        plain_cache.commit([0])
    # the same path inside a tree with side branches, batched beside another request's tree
    tree = DraftTree([11, 4, 40, 30, 41, 8, 21, 42], [-1, 0, 0, 1, 1, 3, 5, 5])
    other = _prefilled(target, [1, 2, 3])
    result = target.forward([_segment(other, DraftTree([6, 7, 8], [-1, 0, 0])),
                             _segment(_prefilled(target, prompt), tree)])
    assert torch.equal(result.logits[1][[0, 1, 3, 5, 6]], torch.stack(plain))
    assert len(result.distinct_experts) == model.config.num_hidden_layers
