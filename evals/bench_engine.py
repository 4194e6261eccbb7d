"""Tokens/s of plain decoding, static EAGLE configurations and Cascade on the portable engine, side
by side in one run, per workload and batch size; every mode's greedy text is checked against plain.

    .venv/bin/python evals/bench_engine.py            # embedded default MoE + default head
writes evals/results/engine_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tqdm import tqdm

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from evals.common import provenance, write  # noqa: E402
from sglang_cascade.controller import SpecConfig  # noqa: E402
from sglang_cascade.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from sglang_cascade.engine.engine import DEFAULT_HEAD_DIR, default_target_path, load_head  # noqa: E402
from sglang_cascade import workloads  # noqa: E402
from training.data import chat_ids  # noqa: E402

STATIC = ("1x1x2", "3x1x4", "5x1x6", "4x2x6")


def run(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Generate for all prompts (the engine batches up to its width); returns outputs and figures."""
    engine.iteration_log.clear()
    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(f"q{i}", ids, SamplingParams(max_new_tokens=max_new_tokens)))
    outs: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
    wall = time.perf_counter() - start
    log = list(engine.iteration_log)
    tokens = sum(len(v) for v in outs.values())
    spec = [it for it in log if any(c != "plain" for c in it["configs"])]
    return {"outputs": [outs[f"q{i}"] for i in range(len(prompts))], "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "iterations": len(log),
            "tokens_per_request_iteration": sum(it["tokens"] for it in log) / max(1, sum(it["batch"] for it in log)),
            "share_iterations_speculating": len(spec) / max(1, len(log)),
            "median_iteration_ms": 1000 * statistics.median(it["wall_s"] for it in log) if log else 0.0,
            "mean_distinct_experts": statistics.mean(statistics.mean(it["distinct_experts"]) for it in log)
            if log else 0.0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="code,chat")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--static", default=",".join(STATIC), help="static configurations to compare")
    ap.add_argument("--prompts-per-batch-1", type=int, default=4, help="prompts run one at a time at batch 1")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="engine_bench")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    path = default_target_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    head = load_head(None, model.config)
    modes = [("plain", None)] + [("static", SpecConfig.parse(s)) for s in args.static.split(",")] + [("cascade", None)]
    rows = []
    cases = [(w, int(b)) for w in args.workloads.split(",") for b in args.batches.split(",")]
    bar = tqdm(total=len(cases) * len(modes), desc="bench")
    for workload, batch in cases:
        n = args.prompts_per_batch_1 if batch == 1 else batch
        prompts = [chat_ids(tokenizer, p) for p in workloads.prompts(workload, "heldout", n)]
        plain_out = None
        for mode, static in modes:
            engine = Engine(EngineConfig(mode=mode, static_config=static, max_batch=batch), model=model,
                            head=head, tokenizer=tokenizer)
            run(engine, prompts[:1], 8)                      # warm-up
            res = run(engine, prompts, args.max_new_tokens)
            plain_out = plain_out or res["outputs"]
            label = static.label() if static else mode
            rows.append({"workload": workload, "batch": batch, "mode": label,
                         "identical_to_plain": res.pop("outputs") == plain_out, **res})
            bar.update()
    bar.close()
    for r in rows:
        same = [x for x in rows if x["workload"] == r["workload"] and x["batch"] == r["batch"]]
        plain = next(x for x in same if x["mode"] == "plain")["tokens_per_s"]
        best_static = max(x["tokens_per_s"] for x in same if x["mode"] not in ("plain", "cascade"))
        r["vs_plain"] = r["tokens_per_s"] / plain
        r["vs_best_static"] = r["tokens_per_s"] / best_static
    head_lines = ["| workload | batch | mode | tok/s | vs plain | vs best static | tokens/iter | "
                  "speculating | median iter ms | distinct experts | = plain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head_lines.append(f"| {r['workload']} | {r['batch']} | {r['mode']} | {r['tokens_per_s']:.1f} | "
                          f"{r['vs_plain']:.3f} | {r['vs_best_static']:.3f} | "
                          f"{r['tokens_per_request_iteration']:.2f} | {r['share_iterations_speculating']:.0%} | "
                          f"{r['median_iteration_ms']:.0f} | {r['mean_distinct_experts']:.1f} | "
                          f"{'yes' if r['identical_to_plain'] else 'NO'} |")
    prov = provenance()
    table = (f"Portable engine, embedded default MoE + default EAGLE-3 head, greedy, {args.max_new_tokens} "
             f"new tokens per prompt; {prov['machine']}; commit {prov['commit']}; {prov['date']}.\n\n"
             + "\n".join(head_lines) + "\n")
    write(args.out, {**prov, "target": str(path), "head": str(DEFAULT_HEAD_DIR), "args": vars(args),
                     "results": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
