"""What the plugin's live expert counts cost a verify on the CPU: PrunedExperts.rewrite() over every MoE
layer of one verify, plus the count at completion, against the rewrite alone (counting off).

    .venv/bin/python evals/expert_count_overhead.py     # writes evals/results/expert_count_overhead.{json,md}

Shapes of the default MoE (30 MoE layers, top-1 of 8 experts), chains of 3 steps (4 rows a request),
at batch 1 (nothing cut) and batch 8 (mixed budgets, rows cut); one torch thread; median of 21 reps.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time
from collections import namedtuple

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from evals.common import provenance, write  # noqa: E402
from sglang_cascade.plugin.pruned_experts import PrunedExperts  # noqa: E402

LAYERS, EXPERTS, TOP_K, WIDTH, REPS = 30, 8, 1, 4, 21
TopKOutput = namedtuple("TopKOutput", "topk_weights topk_ids router_logits")   # SGLang's field names


def verify_us(batch: int, counting: bool) -> float:
    gen = torch.Generator().manual_seed(batch)
    weights, ids = torch.softmax(torch.randn(batch * WIDTH, EXPERTS, generator=gen), -1).topk(TOP_K, -1)
    routed = TopKOutput(weights, ids.to(torch.int32), None)
    budgets = [WIDTH - 1 - (i % WIDTH) for i in range(batch)]    # batch 1: uncut; batch 8: every depth
    routing = PrunedExperts()
    routing.num_experts = EXPERTS if counting else 0
    samples = []
    for _ in range(REPS):
        routing.arm(budgets, WIDTH, "cpu")
        start = time.perf_counter()
        for layer in range(LAYERS):
            routing.rewrite(layer, routed)
        counts = routing.disarm()
        if counts is not None:
            counts.resolve()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def main() -> dict:
    torch.set_num_threads(1)
    rows = []
    for batch in (1, 8):
        off, on = verify_us(batch, False), verify_us(batch, True)
        rows.append({"batch": batch, "rows": batch * WIDTH, "rewrite_us": off, "with_counts_us": on,
                     "overhead_us": on - off})
    payload = {**provenance(), "layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K, "reps": REPS, "rows": rows}
    md = (f"Live expert counts, CPU cost per verify ({LAYERS} layers, top-{TOP_K} of {EXPERTS}, one thread, median "
          f"of {REPS}); {payload['machine']}; commit {payload['commit']}; {payload['date']}. Command: "
          f"`python evals/expert_count_overhead.py`.\n\n| batch | rows | rewrite only, us | with counts, us | "
          f"overhead, us |\n|---|---|---|---|---|\n"
          + "".join(f"| {r['batch']} | {r['rows']} | {r['rewrite_us']:.0f} | {r['with_counts_us']:.0f} | "
                    f"{r['overhead_us']:.0f} |\n" for r in rows))
    write("expert_count_overhead", payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
