"""Micro-benchmark: what the Cascade controller's decisions cost per iteration.

Drives CascadeController with a synthetic batch (random acceptance per request, request churn,
per-layer expert counts) and times only the controller calls an engine makes each iteration
(decide + observe, plus add/finish on churn). Prints a table and writes a JSON report.

    python evals/bench_controller.py [--batch-sizes 1 256] [--iterations 2000] [--iteration-ms 30]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_cascade.controller import (CascadeConfig, CascadeController, IterationRecord,  # noqa: E402
                                       MoECostModel, MoEShape, RequestObservation)

# A small MoE (30 layers, 16 experts, top-4, fp32; the embedded default MoE's shape before its top-1 rebuild).
SHAPE = MoEShape(num_layers=30, hidden_size=576, num_experts=16, top_k=4, expert_params=3 * 576 * 96,
                 dense_params=70_000_000, kv_bytes_per_token=2 * 30 * 192 * 4, bytes_per_param=4,
                 draft_params=10_000_000)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.node()}"


def bench(batch: int, iterations: int, seed: int) -> dict:
    rng = random.Random(seed)
    ctl = CascadeController(CascadeConfig(), MoECostModel(SHAPE))
    accept = {}
    next_id = 0

    def new_request():
        nonlocal next_id
        rid = f"r{next_id}"
        next_id += 1
        accept[rid] = rng.random()
        return rid

    rids = [new_request() for _ in range(batch)]
    per_iter = []
    for it in range(iterations):
        churn = None
        if rng.random() < 0.05:   # a request finishes and another joins
            churn = (rng.randrange(batch), new_request())
        t0 = time.perf_counter_ns()
        if churn:
            k, rid = churn
            ctl.finish_request(rids[k])
            rids[k] = rid
            ctl.add_request(rid)
        cfgs = ctl.decide(rids)
        t1 = time.perf_counter_ns()
        obs = []
        tokens = 0
        for rid in rids:
            c = cfgs[rid]
            a = 0
            while a < c.steps and rng.random() < accept[rid]:
                a += 1
            obs.append(RequestObservation(rid, c, a, c.draft_tokens, 500 + it))
            tokens += c.draft_tokens
        distinct = [min(16, 4 + tokens // 3) for _ in range(SHAPE.num_layers)]
        record = IterationRecord(0.02 + 1e-5 * tokens * rng.uniform(0.95, 1.05), obs, distinct, 0.002)
        t2 = time.perf_counter_ns()
        ctl.observe(record)
        t3 = time.perf_counter_ns()
        if it >= 50:   # skip the start-up (calibration, first phases)
            per_iter.append((t1 - t0 + t3 - t2) / 1e3)
    per_iter.sort()
    median = statistics.median(per_iter)
    return {"batch": batch, "iterations": len(per_iter), "median_us_per_iteration": median,
            "p90_us_per_iteration": per_iter[int(0.9 * (len(per_iter) - 1))],
            "median_us_per_request_iteration": median / batch,
            "speculating_share_at_end": ctl.summary()["speculating_share"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--iteration-ms", type=float, default=30.0,
                    help="nominal engine iteration time to compare with (default 30: the CPU default model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "controller_overhead.json"))
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]   # other work on the machine inflates the tail figures
    results = [bench(b, args.iterations, args.seed) for b in args.batch_sizes]
    for r in results:
        r["percent_of_iteration"] = 100 * r["median_us_per_iteration"] / (1e3 * args.iteration_ms)
    print(f"{'batch':>6} {'median us/iter':>15} {'p90 us/iter':>12} {'us/request-iter':>16} "
          f"{'% of ' + format(args.iteration_ms, 'g') + ' ms':>12}")
    for r in results:
        print(f"{r['batch']:>6} {r['median_us_per_iteration']:>15.1f} {r['p90_us_per_iteration']:>12.1f} "
              f"{r['median_us_per_request_iteration']:>16.2f} {r['percent_of_iteration']:>12.3f}")
    report = {"benchmark": "Cascade controller decide+observe cost", "machine": machine(),
              "python": platform.python_version(), "load_average_1m_at_start": load,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python evals/bench_controller.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "nominal_iteration_ms": args.iteration_ms, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
