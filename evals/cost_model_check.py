"""Does the controller's MoE cost model predict verify cost? Predicted versus measured iteration time
across draft-tree sizes on the embedded default, at batch 1 and batch 4.

    .venv/bin/python evals/cost_model_check.py       # writes evals/results/cost_model_check.{json,md,png}

Each static configuration runs held-out code prompts on the portable engine; every iteration is fed,
in order, to two cost models: one that sees all iterations ("fitted") and one that sees only plain
and 2-token iterations and must extrapolate to larger trees ("extrapolated"), which is the situation
of a controller that has not tried a large tree yet.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from evals.common import RESULTS, provenance, write  # noqa: E402
from sglang_cascade import workloads  # noqa: E402
from sglang_cascade.controller import IterationRecord, MoECostModel, RequestObservation, SpecConfig  # noqa: E402
from sglang_cascade.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from sglang_cascade.engine.engine import default_target_path, load_head, moe_shape  # noqa: E402

CONFIGS = ("0", "1x1x2", "2x1x3", "3x1x4", "4x2x6", "5x2x8", "6x3x12", "7x4x16")
LEARN_FROM = 2  # the extrapolating model sees trees of at most this many tokens


def records(engine: Engine, config: SpecConfig, prompts: list[list[int]],
            max_new_tokens: int) -> list[IterationRecord]:
    """Run the prompts (every request on `config`) and rebuild each iteration as the controller sees it."""
    engine.iteration_log.clear()
    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(f"q{i}", ids, SamplingParams(max_new_tokens=max_new_tokens)))
    while engine.has_work():
        engine.step()
    return [IterationRecord(it["wall_s"], [RequestObservation(rid, config, 0, n, seq) for rid, n, seq
                                           in zip(it["rids"], it["tree_sizes"], it["seq_lens"])],
                            it["distinct_experts"], it["draft_s"])
            for it in engine.iteration_log]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default="cost_model_check")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_cascade.workloads import chat_ids

    path = default_target_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    head = load_head(None, model.config)
    fitted = MoECostModel(moe_shape(model.config, head))
    extrapolated = MoECostModel(moe_shape(model.config, head))
    measured: list[tuple[int, str, IterationRecord]] = []
    cases = [(int(b), c) for b in args.batches.split(",") for c in args.configs.split(",")]
    for batch, text in tqdm(cases, desc="cost model check"):
        cfg = SpecConfig.parse(text)
        mode = "static" if cfg.speculative else "plain"
        engine = Engine(EngineConfig(mode=mode, static_config=cfg if cfg.speculative else None, max_batch=batch),
                        model=model, head=head, tokenizer=tokenizer)
        prompts = [chat_ids(tokenizer, p) for p in workloads.prompts("code", "heldout", batch, seed=1)]
        for rec in records(engine, cfg, prompts, args.max_new_tokens):
            if len(rec.requests) != batch:
                continue  # requests finishing at different times: keep the full-batch iterations
            measured.append((batch, cfg.label(), rec))
            fitted.observe(rec)
            if cfg.draft_tokens <= LEARN_FROM:
                extrapolated.observe(rec)
    rows = []
    for batch, label in dict.fromkeys((b, lbl) for b, lbl, _ in measured):
        recs = [r for b, lbl, r in measured if (b, lbl) == (batch, label)]
        rows.append({
            "batch": batch, "config": label, "tokens_verified": sum(o.tokens_verified for o in recs[0].requests),
            "iterations": len(recs),
            "measured_ms": 1000 * statistics.median(r.wall_time_s for r in recs),
            "measured_verify_ms": 1000 * statistics.median(r.wall_time_s - r.draft_time_s for r in recs),
            "fitted_ms": 1000 * statistics.median(fitted.predict(r) for r in recs),
            "extrapolated_ms": 1000 * statistics.median(extrapolated.predict(r) for r in recs),
            "distinct_experts": statistics.mean(statistics.mean(r.distinct_experts) for r in recs),
            "model_distinct_experts": fitted.distinct_experts(sum(o.tokens_verified for o in recs[0].requests)),
        })
    lines = ["| batch | config | tokens verified | measured ms (median) | of which drafting ms | fitted ms | "
             "extrapolated ms | distinct experts measured | model |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['config']} | {r['tokens_verified']} | {r['measured_ms']:.1f} | "
                     f"{r['measured_ms'] - r['measured_verify_ms']:.1f} | {r['fitted_ms']:.1f} | "
                     f"{r['extrapolated_ms']:.1f} | {r['distinct_experts']:.2f} | {r['model_distinct_experts']:.2f} |")
    prov = provenance()
    md = (f"Cost model check, portable engine, embedded default MoE + default head, {prov['machine']}, commit "
          f"{prov['commit']}, {prov['date']}. Command: `python evals/cost_model_check.py`. 'fitted': the "
          f"controller's model fed every iteration; 'extrapolated': fed only trees of <= {LEARN_FROM} tokens.\n\n"
          + "\n".join(lines) + "\n")
    payload = {**prov, "args": vars(args), "model": fitted.describe(), "results": rows}
    write(args.out, payload, md)
    _plot(rows, RESULTS / f"{args.out}.png")
    print(md)
    return payload


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for batch in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == batch]
        xs = [r["tokens_verified"] for r in sel]
        ax.plot(xs, [r["measured_ms"] for r in sel], "o-", label=f"measured, batch {batch}")
        ax.plot(xs, [r["fitted_ms"] for r in sel], "--", label=f"fitted, batch {batch}")
        ax.plot(xs, [r["extrapolated_ms"] for r in sel], ":", label=f"extrapolated, batch {batch}")
    ax.set_xlabel("tokens verified per iteration")
    ax.set_ylabel("iteration time (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
