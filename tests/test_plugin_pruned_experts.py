"""Cut verify rows pull no experts: the rewrite of the router's output. The rewrite itself is torch only
and runs everywhere, against a torch reference of a top-k MoE; SGLang's own CPU MoE path
(`moe_forward_native`) and output type are checked where SGLang imports. The server-level drop is in
test_plugin_server.py."""

from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from sglang_cascade.plugin import pruned_experts
from sglang_cascade.plugin.probe import sglang_missing
from sglang_cascade.plugin.pruned_experts import PrunedExperts

needs_sglang = pytest.mark.skipif(bool(sglang_missing()), reason=sglang_missing() or "")

EXPERTS, TOP_K, HIDDEN, INTER = 16, 4, 32, 24
WIDTH = 4                    # draft tokens per request: steps 3, topk 1
BUDGETS = [3, 0, 1, 3]       # per request; 0 = plain (root only)

# The fields of SGLang's StandardTopKOutput (a NamedTuple): what the rewrite reads and _replace()s.
TopKOutput = namedtuple("TopKOutput", ["topk_weights", "topk_ids", "router_logits"])


class _Experts(torch.nn.Module):
    """The expert weights moe_forward_native reads (the attributes of SGLang's FusedMoE)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.num_experts = EXPERTS
        self.w13_weight = torch.nn.Parameter(torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / HIDDEN ** 0.5)
        self.w2_weight = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / INTER ** 0.5)


def _routed(rows, cls=TopKOutput):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, EXPERTS, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
    return cls(weights / weights.sum(-1, keepdim=True), ids.to(torch.int32), logits)


def _reference_moe(layer, x, topk_output):
    """A top-k MoE in plain torch (SiLU-and-mul over w13's gate and up halves, as SGLang's FusedMoE):
    row i is sum_k weight[i, k] * expert_{id[i, k]}(x[i])."""
    out = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for w, e in zip(topk_output.topk_weights[i], topk_output.topk_ids[i].tolist()):
                gate, up = (layer.w13_weight[e] @ x[i]).chunk(2)
                out[i] += w * (layer.w2_weight[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def _sglang_moe(layer, x, topk_output):
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    with torch.no_grad():
        return moe_forward_native(layer, x, topk_output, MoeRunnerConfig(activation="silu"))


def _kept_rows():
    return [r * WIDTH + j for r, b in enumerate(BUDGETS) for j in range(WIDTH) if j <= b]


def _counting() -> PrunedExperts:
    routing = PrunedExperts()
    routing.num_experts, routing.count_routed = EXPERTS, True
    return routing


def _rewrite_once(cls=TopKOutput):
    """(routed, rewritten, counts) of one counted verify under BUDGETS (counts: layer 7's distinct experts
    (routed, loaded))."""
    routing = _counting()
    routed = _routed(len(BUDGETS) * WIDTH, cls)
    routing.arm(BUDGETS, WIDTH, "cpu")
    rewritten = routing.rewrite(7, routed)
    counts = routing.disarm()
    assert counts.layers == [7]
    (loaded,), (routed_experts,) = counts.resolve()
    return routed, rewritten, (routed_experts, loaded)


def _check_moe(moe, routed, rewritten):
    """Kept rows come out of the MoE as routed; cut rows (weight 0) come out zero."""
    rows = len(BUDGETS) * WIDTH
    kept = _kept_rows()
    cut = [i for i in range(rows) if i not in kept]
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(2))
    layer = _Experts()
    before, after = moe(layer, x, routed), moe(layer, x, rewritten)
    torch.testing.assert_close(after[kept], before[kept])
    assert (after[cut] == 0).all()
    assert before[cut].abs().max() > 0, "cut rows should have had output before the rewrite"


def test_cut_rows_take_live_experts_with_zero_weight_and_kept_rows_are_unchanged():
    routed, rewritten, counts = _rewrite_once()
    rows = len(BUDGETS) * WIDTH
    kept = _kept_rows()
    cut = [i for i in range(rows) if i not in kept]
    assert torch.equal(rewritten.topk_ids[kept], routed.topk_ids[kept])
    assert torch.equal(rewritten.topk_weights[kept], routed.topk_weights[kept])
    assert (rewritten.topk_weights[cut] == 0).all()
    for i in cut:                                     # the request's root row's experts
        assert torch.equal(rewritten.topk_ids[i], routed.topk_ids[i - i % WIDTH])
    live = set(routed.topk_ids[kept].flatten().tolist())
    assert set(rewritten.topk_ids.flatten().tolist()) == live
    assert counts == (len(set(routed.topk_ids.flatten().tolist())), len(live))
    assert counts[1] < counts[0], "this routing should lose experts when rows are cut"
    assert torch.equal(rewritten.router_logits, routed.router_logits)


def test_rewrite_through_a_reference_moe():
    """Torch only: the rewritten routing through a plain top-k MoE keeps kept rows and zeroes cut ones."""
    routed, rewritten, _ = _rewrite_once()
    _check_moe(_reference_moe, routed, rewritten)


def test_outside_a_verify_the_router_output_passes_through():
    routing = PrunedExperts()
    routed = _routed(8)
    assert routing.rewrite(0, routed) is routed       # never armed
    routing.arm([3, 3], 4, "cpu")                     # nothing cut, not counting: not armed
    assert routing.rewrite(0, routed) is routed
    routing.arm([0, 3], 4, "cpu")
    assert routing.disarm() is None                   # nothing counted
    assert routing.rewrite(0, routed) is routed       # disarmed after the verify
    routing = _counting()
    routing.arm([3, 3], 4, "cpu")                     # counting arms uncut verifies too, as the identity
    same = routing.rewrite(0, routed)
    assert torch.equal(same.topk_ids, routed.topk_ids) and torch.equal(same.topk_weights, routed.topk_weights)
    assert routing.disarm().resolve() == ([_distinct(routed)], [_distinct(routed)])


def test_hook_rewrites_the_wrapped_router_output(monkeypatch):
    """The AROUND hook on TopK.forward hands the original's output and the layer id to ROUTING."""
    routing = _counting()
    monkeypatch.setattr(pruned_experts, "ROUTING", routing)
    routed = _routed(len(BUDGETS) * WIDTH)
    topk = SimpleNamespace(layer_id=3)
    routing.arm(BUDGETS, WIDTH, "cpu")
    out = pruned_experts.topk_forward_hook(lambda module, *a, **kw: routed, topk)
    assert routing.disarm().layers == [3]
    cut = [i for i in range(len(BUDGETS) * WIDTH) if i not in _kept_rows()]
    assert (out.topk_weights[cut] == 0).all() and not (routed.topk_weights[cut] == 0).any()


def _distinct(topk_output):
    return len(set(topk_output.topk_ids.flatten().tolist()))


@needs_sglang
def test_sglang_topk_output_and_cpu_moe():
    """SGLang's own StandardTopKOutput keeps its type through the rewrite, and SGLang's CPU MoE
    (`moe_forward_native`) runs kept rows as routed and gives cut rows zero."""
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    assert StandardTopKOutput._fields == TopKOutput._fields
    routed, rewritten, _ = _rewrite_once(StandardTopKOutput)
    assert type(rewritten) is StandardTopKOutput
    _check_moe(_sglang_moe, routed, rewritten)
    x = torch.randn(len(BUDGETS) * WIDTH, HIDDEN, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_sglang_moe(_Experts(), x, rewritten), _reference_moe(_Experts(), x, rewritten))
