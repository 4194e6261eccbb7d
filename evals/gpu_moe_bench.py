"""Verify cost of a real-sized MoE layer stack against tokens verified and distinct experts touched.

Why: Cascade's premise is that a verify pass of n draft tokens costs what its distinct experts move,
not what its FLOPs are. This measures that on a GPU with Qwen3-30B-A3B's MoE shapes (random bf16
weights; 128 experts, top-8, hidden 2048, expert width 768) so the cost model's features can be
checked where it matters. Routing is synthetic: each token picks top-k experts from router logits
plus a shared per-sequence bias (`--locality`; 0 = independent tokens), which spans the range from
independent routing to strongly shared experts.

    python evals/gpu_moe_bench.py --device cuda                     # on a GPU machine
    python evals/gpu_moe_bench.py --device cpu --layers 1 --experts 16 --hidden 256 --expert-width 128

Writes evals/results/<out>.{json,md}. `--impl sglang` times SGLang's fused-MoE Triton kernel when
sglang is installed on a CUDA machine; `--impl torch` (default) a per-expert loop over touched experts.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from evals.common import RESULTS, provenance, write  # noqa: E402


def route(tokens: int, experts: int, top_k: int, locality: float, gen: torch.Generator, device) -> tuple:
    logits = torch.randn(tokens, experts, generator=gen) + locality * torch.randn(1, experts, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(device), ids.to(device)


def moe_torch(x, w13, w2, weights, ids):
    """Per touched expert: gate/up, SiLU-and-mul, down; weighted sum back to the tokens."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        rows, slot = (ids == e).nonzero(as_tuple=True)
        h = x[rows] @ w13[e].t()
        gate, up = h.chunk(2, dim=-1)
        out.index_add_(0, rows, ((torch.nn.functional.silu(gate) * up) @ w2[e].t()) * weights[rows, slot, None])
    return out


def moe_sglang(x, w13, w2, weights, ids):
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import fused_experts

    return fused_experts(x, w13, w2, (weights.to(torch.float32), ids.to(torch.int32), None))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impl", choices=("torch", "sglang"), default="torch")
    ap.add_argument("--layers", type=int, default=8, help="MoE layers in the stack (48 in Qwen3-30B-A3B)")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-width", type=int, default=768)
    ap.add_argument("--tokens", default="1,2,3,4,6,8,12,16,24,32,48,64", help="tokens verified per forward")
    ap.add_argument("--locality", default="0,2", help="shared routing bias strengths")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="gpu_moe_bench")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    stack = [(torch.randn(args.experts, 2 * args.expert_width, args.hidden, generator=gen).to(device, dtype) * 0.02,
              torch.randn(args.experts, args.hidden, args.expert_width, generator=gen).to(device, dtype) * 0.02)
             for _ in range(args.layers)]
    moe = moe_sglang if args.impl == "sglang" else moe_torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    expert_bytes = 3 * args.hidden * args.expert_width * torch.finfo(dtype).bits // 8
    rows = []
    for locality in [float(v) for v in args.locality.split(",")]:
        for n in [int(v) for v in args.tokens.split(",")]:
            x = torch.randn(n, args.hidden, generator=gen).to(device, dtype)
            routes = [route(n, args.experts, args.top_k, locality, gen, device) for _ in stack]
            for _ in range(3):  # warm-up (kernel selection, caches)
                for (w13, w2), (wt, ids) in zip(stack, routes):
                    moe(x, w13, w2, wt, ids)
            sync()
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                for (w13, w2), (wt, ids) in zip(stack, routes):
                    moe(x, w13, w2, wt, ids)
                sync()
                times.append(time.perf_counter() - start)
            distinct = statistics.mean(ids.unique().numel() for _, ids in routes)
            median = statistics.median(times)
            rows.append({"locality": locality, "tokens": n, "distinct_experts": distinct, "ms": 1000 * median,
                         "expert_GBps": distinct * args.layers * expert_bytes / median / 1e9})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = ["| locality | tokens | distinct experts / layer | ms per stack | expert bytes / s (GB/s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['locality']} | {r['tokens']} | {r['distinct_experts']:.1f} | {r['ms']:.3f} | "
              f"{r['expert_GBps']:.0f} |" for r in rows]
    prov = provenance()
    md = (f"MoE layer stack ({args.layers} layers, {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, "
          f"expert width {args.expert_width}, {str(dtype).split('.')[-1]}, impl {args.impl}) on {device_name}; "
          f"commit {prov['commit']}; {prov['date']}.\n\n" + "\n".join(lines) + "\n")
    payload = {**prov, "device": device_name, "args": vars(args), "results": rows}
    write(args.out, payload, md, pathlib.Path(args.results_dir) if args.results_dir else RESULTS)
    print(md)
    return payload


if __name__ == "__main__":
    main()
