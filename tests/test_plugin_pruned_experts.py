"""Cut verify rows pull no experts: the rewrite of the router's output, run through SGLang's own CPU MoE
path (`moe_forward_native`) and output type. The server-level drop is in test_plugin_server.py."""

import pytest
import torch

from sglang_cascade.plugin.probe import sglang_missing
from sglang_cascade.plugin.pruned_experts import PrunedExperts

pytestmark = pytest.mark.skipif(bool(sglang_missing()), reason=sglang_missing() or "")

EXPERTS, TOP_K, HIDDEN, INTER = 16, 4, 32, 24
WIDTH = 4                    # draft tokens per request: steps 3, topk 1
BUDGETS = [3, 0, 1, 3]       # per request; 0 = plain (root only)


class _Experts(torch.nn.Module):
    """The expert weights moe_forward_native reads (the attributes of SGLang's FusedMoE)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.num_experts = EXPERTS
        self.w13_weight = torch.nn.Parameter(torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / HIDDEN ** 0.5)
        self.w2_weight = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / INTER ** 0.5)


def _routed(rows):
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, EXPERTS, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
    return StandardTopKOutput(weights / weights.sum(-1, keepdim=True), ids.to(torch.int32), logits)


def _moe(layer, x, topk_output):
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    with torch.no_grad():
        return moe_forward_native(layer, x, topk_output, MoeRunnerConfig(activation="silu"))


def _kept_rows():
    return [r * WIDTH + j for r, b in enumerate(BUDGETS) for j in range(WIDTH) if j <= b]


def test_cut_rows_take_live_experts_with_zero_weight_and_kept_rows_are_unchanged():
    rows = len(BUDGETS) * WIDTH
    routing = PrunedExperts()
    routing.count = True
    routed = _routed(rows)
    routing.arm(BUDGETS, WIDTH, "cpu")
    rewritten = routing.rewrite(7, routed)
    counts = routing.disarm()

    kept = _kept_rows()
    cut = [i for i in range(rows) if i not in kept]
    assert torch.equal(rewritten.topk_ids[kept], routed.topk_ids[kept])
    assert torch.equal(rewritten.topk_weights[kept], routed.topk_weights[kept])
    assert (rewritten.topk_weights[cut] == 0).all()
    for i in cut:                                     # the request's root row's experts
        assert torch.equal(rewritten.topk_ids[i], routed.topk_ids[i - i % WIDTH])
    live = set(routed.topk_ids[kept].flatten().tolist())
    assert set(rewritten.topk_ids.flatten().tolist()) == live
    assert counts == {7: (len(set(routed.topk_ids.flatten().tolist())), len(live))}
    assert counts[7][1] < counts[7][0], "this routing should lose experts when rows are cut"

    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(2))
    layer = _Experts()
    before, after = _moe(layer, x, routed), _moe(layer, x, rewritten)
    torch.testing.assert_close(after[kept], before[kept])   # SGLang's CPU MoE: kept rows as routed
    assert (after[cut] == 0).all()


def test_outside_a_verify_the_router_output_passes_through():
    routing = PrunedExperts()
    routed = _routed(8)
    assert routing.rewrite(0, routed) is routed       # never armed
    routing.arm([3, 3], 4, "cpu")                     # nothing cut, not counting: not armed
    assert routing.rewrite(0, routed) is routed
    routing.arm([0, 3], 4, "cpu")
    routing.disarm()
    assert routing.rewrite(0, routed) is routed       # disarmed after the verify
    routing.count = True
    routing.arm([3, 3], 4, "cpu")                     # counting arms uncut verifies too, as the identity
    same = routing.rewrite(0, routed)
    assert torch.equal(same.topk_ids, routed.topk_ids) and torch.equal(same.topk_weights, routed.topk_weights)
    assert routing.disarm()[0][0] == _distinct(routed)


def _distinct(topk_output):
    return len(set(topk_output.topk_ids.flatten().tolist()))
