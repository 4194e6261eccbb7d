"""A run's prompts and the target's greedy answers to them (self-distillation).

Why self-distillation: a draft head is judged by how often it guesses the target's own greedy tokens,
so the target's answers are the right training text, and no corpus or hub has to be reachable. The
prompts come from sglang_cascade.workloads (offline corpora, seeded) or from the user's own files, and
go to the target in the format a server sends them (workloads.SERVED: code as a raw completion prefix,
"code-chat" and the rest chat-templated), so the head learns the answers it will be asked to draft.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random

import torch
from tqdm.auto import tqdm

from sglang_cascade import workloads


def request_format(workload: str, prompt_files: dict[str, str]) -> str:
    """How a run's workload is sent: a user's prompt file as chat, a built-in one as workloads.SERVED says."""
    return "chat" if workload in prompt_files else workloads.SERVED[workload][1]


def run_prompts(workload: str, split: str, n: int, seed: int, prompt_files: dict[str, str]) -> list[str]:
    """A run's prompts: the user's file for a workload named in `prompt_files`, else the built-in sources
    (a served workload's texts: workloads.served_prompts)."""
    if workload not in prompt_files:
        return workloads.served_prompts(workload, split, n, seed)[1]
    pool = workloads.file_prompts(prompt_files[workload], split)
    if len(pool) < n:
        raise ValueError(f"{prompt_files[workload]}: {n} {split} prompts asked, the file holds {len(pool)} "
                         f"(1 in {workloads.HELDOUT_EVERY} prompts is held out); add prompts or lower n_{split}")
    return random.Random(f"{workload}-{split}-{seed}").sample(pool, n)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                   desc: str = "generate") -> list[list[int]]:
    """The target's greedy answer to each prompt (left-padded batches on the model's device), cut after
    the first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    answers = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc=desc):
        batch = prompt_ids[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:cut])
    return answers


def distilled(model, tokenizer, target_key: str, workload: str, n_train: int, n_heldout: int, seed: int,
              max_new_tokens: int, batch_size: int, cache_dir, prompt_files: dict[str, str]) -> dict:
    """{"train": [...], "heldout": [...]} of {"prompt": ids, "answer": ids}, cached on disk as token ids.

    The cache key covers the target, the prompts, their request format and the generation settings, so a
    changed input never reuses stale answers."""
    form = request_format(workload, prompt_files)
    train = run_prompts(workload, "train", n_train, seed, prompt_files)
    heldout = run_prompts(workload, "heldout", n_heldout, seed, prompt_files)
    key = hashlib.sha256(json.dumps([target_key, form, train, heldout, max_new_tokens]).encode()).hexdigest()[:16]
    path = pathlib.Path(cache_dir) / f"{workload}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = {}
    for name, texts in (("train", train), ("heldout", heldout)):
        ids = [workloads.request_ids(tokenizer, form, p) for p in texts]
        answers = greedy_answers(model, tokenizer, ids, max_new_tokens, batch_size, desc=f"{workload}/{name}")
        result[name] = [{"prompt": p, "answer": a} for p, a in zip(ids, answers)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result
