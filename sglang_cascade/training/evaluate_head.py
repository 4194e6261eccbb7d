"""How often a draft head's chain is accepted on traffic as it is served, per position and per verify.

    python -m sglang_cascade.training.evaluate_head --target default --head sglang_cascade/drafters/checkpoints/default

Training scores its head on the answers to chat-templated prompts of its own run. Servers also see raw
completions (code prefixes through /v1/completions or /generate), and a verify lands only where the
previous one left off. So this report takes every served workload in its own request format
(sglang_cascade.workloads.SERVED: code as a raw completion prefix, code-chat and the rest as chat),
the target's greedy answers to held-out prompts (the first `--new-tokens` tokens, EOS ends an
answer), and gives per workload: the mean accept length over every answer position (per position)
and the tokens per verify of a greedy static chain of 1..steps steps, topk 1 (per verify: what an
engine serving that chain measures). Writes acceptance.json and acceptance.md into the head's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import torch

from sglang_cascade.drafters.eagle3 import Eagle3DraftHead
from sglang_cascade import workloads
from sglang_cascade.target_digest import check_pair
from sglang_cascade.training.data import greedy_answers
from sglang_cascade.training.train_eagle3 import chain_acceptance, load_target, target_features

# per verify at 3 steps, topk 1: what a head for the default MoE should reach on each served workload
GOALS = {"code": 1.8, "code-chat": 2.0, "math": 2.0, "extraction": 2.5, "chat": 2.5}
GOAL_STEPS = 3


def evaluate(target, tokenizer, head, n: int, new_tokens: int, steps: int, seed: int = 0) -> dict:
    embed = target.get_input_embeddings().weight.detach().float()
    rows = {}
    for name in workloads.SERVED:
        form, texts = workloads.served_prompts(name, "heldout", n, seed)
        ids = [workloads.request_ids(tokenizer, form, t) for t in texts]
        answers = greedy_answers(target, tokenizer, ids, new_tokens, batch_size=8, desc=f"{name} answers")
        seqs = [{"prompt": p, "answer": a} for p, a in zip(ids, answers) if len(a) > steps + 1]
        feats = target_features(target, seqs, head.config.aux_layer_ids, batch_size=8, desc=f"{name} features")
        acc = chain_acceptance(head, embed, feats, steps, first_tokens=new_tokens)
        lengths = sorted(map(len, answers))
        rows[name] = {"format": form, "prompts": len(seqs), "answer_tokens_median": lengths[len(lengths) // 2],
                      **acc}
    return rows


def table(rows: dict, steps: int) -> list[str]:
    lines = ["| workload | format | prompts | answer tokens (median) | mean accept length (per position, "
             f"{steps} steps) | " + " | ".join(f"tokens per verify, {s} steps" for s in range(1, steps + 1))
             + f" | goal per verify at {GOAL_STEPS} steps |", "|---" * (steps + 6) + "|"]
    for name, r in rows.items():
        per_verify = r["tokens_per_verify"]
        got = per_verify[GOAL_STEPS - 1] if steps >= GOAL_STEPS else None
        verdict = "" if got is None else ("met" if got >= GOALS[name] else "missed")
        lines.append(f"| {name} | {r['format']} | {r['prompts']} | {r['answer_tokens_median']} | "
                     f"{r['mean_accept_len']:.2f} | " + " | ".join(f"{x:.2f}" for x in per_verify)
                     + f" | >= {GOALS[name]}: {verdict} |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="default", help="target model folder, or 'default' for the embedded MoE")
    ap.add_argument("--head", required=True, help="the draft head's folder (SGLang EAGLE-3 layout)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts per served workload")
    ap.add_argument("--new-tokens", type=int, default=256, help="answer tokens scored (EOS ends an answer sooner)")
    ap.add_argument("--steps", type=int, default=5, help="deepest chain scored")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    head_dir = pathlib.Path(args.head)
    if not (head_dir / "config.json").is_file():
        ap.error(f"--head {head_dir}: no config.json there; give the folder of an EAGLE-3 head")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    target, tokenizer, digest = load_target(args.target)
    print(f"evaluate_head: {check_pair(target.name_or_path, head_dir)}", file=sys.stderr)
    head = Eagle3DraftHead.from_pretrained(head_dir).eval()
    rows = evaluate(target, tokenizer, head, args.prompts, args.new_tokens, args.steps)
    result = {"target": args.target, "target_digest": digest, "head": str(head_dir), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch threads",
              "minutes": (time.time() - start) / 60, "new_tokens": args.new_tokens, "workloads": rows}
    command = "python -m sglang_cascade.training.evaluate_head " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Acceptance on served traffic", "", f"`{command}` ({result['date']}, {result['machine']}, "
             f"{result['minutes']:.1f} min; target digest {digest}). Greedy answers to held-out prompts in each "
             f"workload's request format, the first {args.new_tokens} tokens. Per position: every answer "
             f"position scored; per verify: a static chain run verifying where the last verify left off, the "
             f"bonus token included (what serving measures).", "", *table(rows, args.steps)]
    (head_dir / "acceptance.json").write_text(json.dumps(result, indent=2) + "\n")
    (head_dir / "acceptance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
