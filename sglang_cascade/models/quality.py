"""Quality report of the default MoE against its dense source (SmolLM2-135M-Instruct).

Why: the MoE is a stand-in target for Cascade; we need to know how close it stays to the dense
model (perplexity, greedy agreement) and how its routing spreads over consecutive tokens, because
the distinct experts a verify pass touches is exactly what makes speculation expensive on MoEs.
All text is held out from calibration (see default_model.HELDOUT_*).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess

import torch
from tqdm.auto import tqdm

from sglang_cascade.workloads import chat_ids

from .default_model import (HELDOUT_PROMPTS, HELDOUT_STDLIB, greedy_continuations, load_dense, pydoc_topics,
                            stdlib_ids)

WINDOWS = (1, 2, 4, 8, 16)
CONT_TOKENS = 64  # dense greedy continuation length for teacher-forced agreement
FREE_PROMPTS = 10  # prompts for free-running exact-match
FREE_TOKENS = 32
STDLIB_TOKENS = 512
N_TOPICS = 4  # held-out pydoc topics (the odd-numbered ones), first STDLIB_TOKENS tokens each


@torch.no_grad()
def token_logits(model, seq: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([seq])).logits[0].float()


def nll_sum(logits: torch.Tensor, seq: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(seq[1:]), reduction="sum").item()


def perplexities(dense, moe, docs: list[list[int]], progress: bool) -> tuple[float, float]:
    """Token-level perplexity of both models over all next-token predictions in `docs`."""
    totals, count = [0.0, 0.0], 0
    for seq in tqdm(docs, desc="Perplexity", disable=not progress):
        for i, model in enumerate((dense, moe)):
            totals[i] += nll_sum(token_logits(model, seq), seq)
        count += len(seq) - 1
    return tuple(float(torch.tensor(t / count).exp()) for t in totals)


def greedy_agreement(dense, moe, transcripts, prompt_lens, progress: bool) -> float:
    """Share of answer positions where the MoE's greedy next token equals the dense one,
    teacher-forced on the dense model's own greedy answers."""
    same = total = 0
    for seq, n in tqdm(list(zip(transcripts, prompt_lens)), desc="Greedy agreement", disable=not progress):
        a = token_logits(dense, seq)[n - 1:-1].argmax(-1)
        b = token_logits(moe, seq)[n - 1:-1].argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    return same / total


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def routing_stats(moe, docs: list[list[int]], progress: bool) -> dict:
    """Distinct experts per layer touched by k consecutive tokens (non-overlapping windows)."""
    top_k = moe.config.num_experts_per_tok
    per_layer = {k: torch.zeros(moe.config.num_hidden_layers) for k in WINDOWS}
    windows = {k: 0 for k in WINDOWS}
    for seq in tqdm(docs, desc="Routing stats", disable=not progress):
        out = moe(input_ids=torch.tensor([seq]), output_router_logits=True)
        chosen = torch.stack([lg.topk(top_k, dim=-1).indices for lg in out.router_logits])  # (L, T, k)
        onehot = torch.zeros(*chosen.shape[:2], moe.config.num_local_experts).scatter(2, chosen, 1.0)
        for k in WINDOWS:
            n = onehot.shape[1] // k
            touched = onehot[:, :n * k].reshape(onehot.shape[0], n, k, -1).amax(dim=2).sum(-1)
            per_layer[k] += touched.sum(1)
            windows[k] += n
    result = {}
    for k in WINDOWS:
        mean = per_layer[k] / windows[k]
        result[str(k)] = {"mean": round(mean.mean().item(), 3), "layer_min": round(mean.min().item(), 3),
                          "layer_max": round(mean.max().item(), 3)}
    return result


def machine_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return (f"{os.cpu_count()}-core {name} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} torch threads")


def evaluate(moe_dir, progress: bool = True) -> dict:
    """Compare the MoE in `moe_dir` with the dense GGUF model on held-out text."""
    from transformers import MixtralForCausalLM

    dense, tokenizer = load_dense(progress)
    moe = MixtralForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    transcripts = greedy_continuations(dense, tokenizer, HELDOUT_PROMPTS, CONT_TOKENS, progress=progress)
    prompt_lens = [len(chat_ids(tokenizer, p)) for p in HELDOUT_PROMPTS]
    code = stdlib_ids(tokenizer, HELDOUT_STDLIB, STDLIB_TOKENS)
    prose = [tokenizer(t)["input_ids"][:STDLIB_TOKENS] for t in pydoc_topics(1)[:N_TOPICS]]

    ppl_code = perplexities(dense, moe, code, progress)
    ppl_prose = perplexities(dense, moe, prose, progress)
    ppl_chat = perplexities(dense, moe, transcripts, progress)
    agreement = greedy_agreement(dense, moe, transcripts, prompt_lens, progress)
    prompts = HELDOUT_PROMPTS[:FREE_PROMPTS]
    free = greedy_continuations(moe, tokenizer, prompts, FREE_TOKENS, progress=progress)
    exact = [common_prefix(f[n:], t[n:n + FREE_TOKENS]) for f, t, n in zip(free, transcripts, prompt_lens)]
    build = json.loads((pathlib.Path(moe_dir) / "moefy_stats.json").read_text())
    layer_err = [s["val_rel_err"] for s in build["layers"]]
    return {
        "model": str(moe_dir),
        "dense": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)",
        "experts": {"count": moe.config.num_local_experts, "top_k": moe.config.num_experts_per_tok,
                    "neurons": moe.config.intermediate_size, "dense_neurons": dense.config.intermediate_size},
        "machine": machine_name(),
        "date": datetime.date.today().isoformat(),
        "perplexity": {"stdlib_code": {"dense": ppl_code[0], "moe": ppl_code[1]},
                       "reference_prose": {"dense": ppl_prose[0], "moe": ppl_prose[1]},
                       "chat_transcripts": {"dense": ppl_chat[0], "moe": ppl_chat[1]}},
        "greedy_agreement_teacher_forced": agreement,
        "free_greedy_exact_match": {"tokens": FREE_TOKENS, "per_prompt": exact,
                                    "mean": sum(exact) / len(exact)},
        "distinct_experts_per_layer": routing_stats(moe, code + prose + transcripts, progress),
        "calibration_tokens": build["calibration_tokens"],
        "layer_val_rel_err": {"mean": sum(layer_err) / len(layer_err), "max": max(layer_err)},
        "example": {"prompt": prompts[0],
                    "dense": tokenizer.decode(transcripts[0][prompt_lens[0]:][:FREE_TOKENS], skip_special_tokens=True),
                    "moe": tokenizer.decode(free[0][prompt_lens[0]:], skip_special_tokens=True)},
    }


def to_markdown(r: dict) -> str:
    p, e = r["perplexity"], r["experts"]
    read = e["top_k"] * e["neurons"]
    lines = [
        f"# Default MoE quality (SmolLM2-135M-Instruct -> Mixtral {e['count']} experts, top-{e['top_k']})",
        "",
        f"Machine: {r['machine']}. Date: {r['date']}. Command: "
        "`python scripts/build_default_moe.py --report evals/results/default_moe_quality.json`.",
        "",
        "| metric | dense | MoE |",
        "|---|---|---|",
        f"| perplexity, held-out stdlib code | {p['stdlib_code']['dense']:.2f} | {p['stdlib_code']['moe']:.2f} |",
        f"| perplexity, held-out Python reference-manual prose | {p['reference_prose']['dense']:.2f} | "
        f"{p['reference_prose']['moe']:.2f} |",
        f"| perplexity, held-out chat (prompt + dense greedy answer) | {p['chat_transcripts']['dense']:.2f} | "
        f"{p['chat_transcripts']['moe']:.2f} |",
        f"| greedy agreement, teacher-forced | 1 | {r['greedy_agreement_teacher_forced']:.3f} |",
        f"| free greedy exact-match length (of {r['free_greedy_exact_match']['tokens']}) | "
        f"{r['free_greedy_exact_match']['tokens']} | {r['free_greedy_exact_match']['mean']:.1f} |",
        "",
        f"A decode reads {e['top_k']} expert(s) of {e['neurons']} neurons per layer: {read / e['dense_neurons']:.2f} "
        f"of the dense FFN's {e['dense_neurons']} neurons, {e['top_k'] / e['count']:.3f} of the MoE layer's FFN weights.",
        "",
        f"Distinct experts touched per layer by k consecutive tokens (of {e['count']}; top-{e['top_k']} per token):",
        "",
        "| k | mean | layer min | layer max |",
        "|---|---|---|---|",
    ]
    for k, s in r["distinct_experts_per_layer"].items():
        lines.append(f"| {k} | {s['mean']:.2f} | {s['layer_min']:.2f} | {s['layer_max']:.2f} |")
    ex, err = r["example"], r["layer_val_rel_err"]
    lines += [
        "",
        f"Build: {r['calibration_tokens']} calibration tokens; per-layer relative FFN error on held-out "
        f"calibration tokens {err['mean']:.3f} mean, {err['max']:.3f} max.",
        "",
        f"Example, greedy, {r['free_greedy_exact_match']['tokens']} tokens: {ex['prompt']!r}",
        f"- dense: {ex['dense']!r}",
        f"- MoE: {ex['moe']!r}",
    ]
    return "\n".join(lines) + "\n"


def write_report(result: dict, json_path) -> None:
    """Write the JSON result and a Markdown table next to it (same stem, .md)."""
    json_path = pathlib.Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(to_markdown(result))
