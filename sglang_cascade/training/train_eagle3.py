"""Train an EAGLE-3 draft head for a target by self-distillation with a test-time-training unroll.

    python -m sglang_cascade.training.train_eagle3 --target default --out sglang_cascade/drafters/checkpoints/default \\
        --config sglang_cascade/drafters/checkpoints/default/run.json

Pipeline: prompts per workload -> the target's greedy answers (cached token ids) -> one target forward per
sequence for the aux hidden states and greedy next tokens (cached) -> draft vocabulary = the most frequent
target tokens in the training answers -> AdamW over an unroll of `ttt_steps` draft steps -> held-out
teacher-forced chain acceptance per workload -> SGLang-layout checkpoint + README with the table.

The unroll is EAGLE-3's: step 0 at index t consumes the fused target features f_t and the embedding of
token t+1; step j consumes the head's own output of step j-1 at index t and the embedding of token
t+1+j, sits at position t+j, and is scored against the target's greedy token after token t+1+j. Step j
attends causally to the step-0 keys and to its own chain's earlier steps at index t, which is exactly
what it sees when drafting j tokens past an accepted prefix.

Devices: `--device` puts the target and the head on the CPU or a GPU; `--target-dtype` picks the
target's dtype (bfloat16 on a GPU by default, as SGLang serves MoEs). The head trains in float32 on
every device: it is small (about 145M parameters for Qwen3-30B-A3B with a 32k draft vocabulary), so
its steps cost little next to the target's forwards, and float32 keeps the unroll's softmaxes and
cross entropy over the draft vocabulary out of bf16 rounding, with no loss scaling to tune; the
checkpoint is saved in bf16 either way. Caches and training state are stored on the CPU, so a run
started on one device resumes on another.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import pathlib
import platform
import re
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sglang_cascade.drafters.eagle3 import Eagle3Config, Eagle3DraftHead
from sglang_cascade.target_digest import compute_digest, record_head_target
from sglang_cascade.workloads import SERVED
from sglang_cascade.training import data

IGNORE = -100
TARGET_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class RunConfig:
    seed: int = 0
    # built-in names are sglang_cascade.workloads.SERVED's: each corpus in the format it is served in
    workloads: list[str] = dataclasses.field(default_factory=lambda: list(SERVED))
    # your own workloads: {"name": "prompts.jsonl"} with one {"prompt": ...} per line, sent as chat; list
    # the names in `workloads` too.
    prompt_files: dict[str, str] = dataclasses.field(default_factory=dict)
    n_train: int = 32  # prompts per workload
    n_heldout: int = 8
    max_new_tokens: int = 96
    gen_batch_size: int = 16
    draft_vocab_size: int = 2048
    intermediate_size: int = 768
    aux_layer_ids: list[int] | None = None  # None: SGLang's default capture layers
    ttt_steps: int = 5  # draft steps unrolled in training
    eval_steps: int = 5  # chain depth of the acceptance report (steps 5, topk 1)
    batch_size: int = 8  # sequences per optimizer step
    train_steps: int = 150
    lr: float = 1e-3
    warmup_steps: int = 15
    weight_decay: float = 0.0
    step_weight: float = 0.8  # loss weight of unroll step j is step_weight**j, as in EAGLE-3
    save_every: int = 25
    threads: int = 0  # torch threads; 0 keeps torch's default

    @classmethod
    def load(cls, path) -> "RunConfig":
        raw = json.loads(pathlib.Path(path).read_text()) if path else {}
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys in {path}: {sorted(unknown)}")
        cfg = cls(**raw)
        unknown_workloads = [w for w in cfg.workloads if w not in SERVED and w not in cfg.prompt_files]
        if unknown_workloads:
            raise ValueError(f"{path}: workloads {unknown_workloads} are neither built in ({', '.join(SERVED)}) "
                             "nor given a file in prompt_files")
        return cfg


def resolve_device(spec: str) -> torch.device:
    """--device: auto (a CUDA device when torch sees one, else the CPU), cpu, cuda or cuda:N. A GPU
    asked for and missing is an error rather than a silent CPU run of many hours."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no GPU visible"
        raise ValueError(f"--device {spec}: torch {torch.__version__} ({why}) has no CUDA device here; pass "
                         f"--device cpu (or auto), or run on a GPU machine with a CUDA build of torch")
    index, count = int(match[1] or torch.cuda.current_device()), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {spec}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}; pass one "
                         f"of those (CUDA_VISIBLE_DEVICES renumbers them)")
    return torch.device("cuda", index)


def target_dtype(name: str, device: torch.device) -> torch.dtype:
    """--target-dtype: auto is bfloat16 on a GPU (what SGLang serves MoEs in, so the head learns the
    features it will be fed, at half float32's memory: Qwen3-30B-A3B is ~61 GB in bf16) and float32 on
    the CPU (bf16 matmuls are slow on most CPUs; the embedded default's run is float32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TARGET_DTYPES[name]


def load_target(path: str, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
    """(model, tokenizer, digest) for a target folder, or for `default`, the embedded default MoE.

    Any transformers causal LM folder (Mixtral, Qwen3-MoE, ...): with `device_map` the weights load
    straight onto `device`, so a GPU run never stages the whole model in host memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path == "default":
        from sglang_cascade.models.default_model import ensure_default_moe

        path = ensure_default_moe()
    path = pathlib.Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the digest is what the target computes (config and weights; main adds the dtype), not where it lives
    return model, tokenizer, compute_digest(path)


@torch.no_grad()
def target_features(model, seqs: list[dict], aux_ids: list[int], batch_size: int, desc: str) -> list[dict]:
    """Per sequence: ids [T], aux [T, num_aux*H] (bf16; the output of target layer k for aux id k, HF
    hidden_states[k+1]) and the target's greedy next token at the answer positions (from plen-1 on; 0
    before, never used), from one right-padded forward per batch on the model's device; results on the CPU.

    Hooks on the aux layers keep only their outputs: output_hidden_states would hold every layer's
    [batch, T, H] until the forward ends (49 of them for Qwen3-30B-A3B). The full-vocabulary head runs
    on answer rows only: it costs as much as the whole body of a small target."""
    layers, captured = model.get_decoder().layers, {}

    def capture(k):
        def hook(module, args, output):  # decoder layers return a tensor, or a tuple led by it
            captured[k] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layers[k].register_forward_hook(capture(k)) for k in set(aux_ids)]
    out = []
    try:
        for start in tqdm(range(0, len(seqs), batch_size), desc=desc):
            batch = seqs[start:start + batch_size]
            full = [s["prompt"] + s["answer"] for s in batch]
            width = max(map(len, full))
            ids = torch.tensor([f + [0] * (width - len(f)) for f in full])
            mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
            res = model.get_decoder()(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                      use_cache=False)
            aux = torch.cat([captured[k] for k in aux_ids], dim=-1).to(torch.bfloat16).cpu()
            captured.clear()
            for i, (s, f) in enumerate(zip(batch, full)):
                n, plen = len(f), len(s["prompt"])
                greedy = torch.zeros(n, dtype=torch.int64)
                greedy[plen - 1:] = model.get_output_embeddings()(res.last_hidden_state[i, plen - 1:n]).argmax(-1).cpu()
                out.append({"ids": ids[i, :n].clone(), "aux": aux[i, :n].clone(), "greedy": greedy, "plen": plen})
    finally:
        for h in handles:
            h.remove()
    return out


def draft_vocab(train: list[dict], vocab_size: int, size: int) -> torch.Tensor:
    """The `size` target ids the target emits most often in the training answers (ties: lower id),
    ascending. Rarer tokens have no draft id: the head cannot propose them."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in train:
        counts += torch.bincount(s["greedy"][s["plen"] - 1:-1], minlength=vocab_size).double()
    order = torch.sort(-counts, stable=True).indices
    return order[:size].sort().values


class UnrollAttention:
    """Attention of the unroll: step 0 is causal over its own keys; step j adds, at each index t, the
    keys of steps 1..j at that same index (its own chain). Call once per step, in order."""

    def __init__(self):
        self.k, self.v = [], []

    def __call__(self, q, k, v):  # q [B,T,n,d], k/v [B,T,n_kv,d]
        self.k.append(k)
        self.v.append(v)
        rep, T = q.shape[-2] // k.shape[-2], q.shape[1]
        qh = q.transpose(1, 2) * q.shape[-1] ** -0.5  # [B,n,T,d]
        ks = [x.repeat_interleave(rep, dim=2).transpose(1, 2) for x in self.k]
        vs = [x.repeat_interleave(rep, dim=2).transpose(1, 2) for x in self.v]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = [(qh @ ks[0].transpose(-1, -2)).masked_fill(~causal, float("-inf"))]
        scores += [(qh * kj).sum(-1, keepdim=True) for kj in ks[1:]]
        p = torch.cat(scores, dim=-1).softmax(-1)
        out = p[..., :T] @ vs[0]
        for j, vj in enumerate(vs[1:]):
            out = out + p[..., T + j:T + j + 1] * vj
        return out.transpose(1, 2).flatten(-2)


def collate(seqs: list[dict], device: torch.device | str = "cpu") -> dict:
    """Right-padded batch on `device` (causal attention never lets a real index see the padding)."""
    width = max(len(s["ids"]) for s in seqs)
    batch = {
        "ids": torch.stack([F.pad(s["ids"], (0, width - len(s["ids"]))) for s in seqs]),
        "aux": torch.stack([F.pad(s["aux"], (0, 0, 0, width - len(s["aux"]))) for s in seqs]),
        "greedy": torch.stack([F.pad(s["greedy"], (0, width - len(s["greedy"]))) for s in seqs]),
        "len": torch.tensor([len(s["ids"]) for s in seqs]),
        "plen": torch.tensor([s["plen"] for s in seqs]),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["aux"] = batch["aux"].float()  # bf16 over the bus, float32 for the head
    return batch


def unroll(head: Eagle3DraftHead, embed: torch.Tensor, batch: dict, steps: int):
    """Yield (j, rows, logits [len(rows), D]) for unroll steps j = 0..steps-1 of a collated batch.

    rows index the flattened [B*T] grid: answer indices t >= plen-1 (where drafting starts) whose label,
    the target's greedy token after token t+1+j, exists. Step 0 runs on every real token (its keys are
    the context of all later steps); step j > 0 only on its own rows, so no work goes to the prompt or
    to padding beyond what attention needs."""
    ids, (B, T) = batch["ids"].flatten(), batch["ids"].shape
    idx = torch.arange(T, device=ids.device)
    t = idx.repeat(B)
    answer = idx >= batch["plen"][:, None] - 1
    grid = UnrollAttention()
    run = (idx < batch["len"][:, None]).flatten().nonzero().squeeze(1)
    full = torch.zeros(B * T, head.config.hidden_size, device=ids.device)
    full[run] = head.fuse(batch["aux"].flatten(0, 1)[run])
    for j in range(steps):
        rows = (answer & (idx + 2 + j < batch["len"][:, None])).flatten().nonzero().squeeze(1)
        if j:
            run = rows

        def attend(q, k, v, run=run):
            def to_grid(x):
                return x.new_zeros(B * T, *x.shape[1:]).index_copy(0, run, x).view(B, T, *x.shape[1:])
            return grid(to_grid(q), to_grid(k), to_grid(v)).flatten(0, 1)[run]

        src = (run + 1 + j).clamp(max=B * T - 1)
        hidden = head.forward_hidden(embed[ids[src]], full[run], t[run] + j, attend)
        full = full.new_zeros(full.shape).index_copy(0, run, hidden)
        yield j, rows, head.logits(full[rows])


def target_to_draft(head: Eagle3DraftHead) -> torch.Tensor:
    """Draft id of every target id; IGNORE for tokens outside the draft vocabulary (never predictable)."""
    n, device = head.config.draft_vocab_size, head.d2t.device
    to_draft = torch.full((head.config.vocab_size,), IGNORE, dtype=torch.int64, device=device)
    to_draft[head.to_target_ids(torch.arange(n, device=device))] = torch.arange(n, device=device)
    return to_draft


def loss_fn(head, embed, batch, to_draft: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Cross entropy of each unroll step against the target's greedy token, weighted step_weight**j."""
    greedy = batch["greedy"].flatten()
    total, weights = 0.0, 0.0
    for j, rows, logits in unroll(head, embed, batch, cfg.ttt_steps):
        label = to_draft[greedy[rows + 1 + j]]
        if (label != IGNORE).any():
            total = total + cfg.step_weight ** j * F.cross_entropy(logits, label, ignore_index=IGNORE)
            weights += cfg.step_weight ** j
    return total / max(weights, 1e-9)


@torch.no_grad()
def chain_acceptance(head, embed, seqs: list[dict], steps: int, batch_size: int = 8, first_tokens: int = 256) -> dict:
    """Teacher-forced greedy chain acceptance (topk 1): at each answer index t whose whole chain lies in
    the sequence, depth j counts as accepted when draft steps 0..j all equal the target's greedy tokens
    (embeddings of earlier steps are then the draft's own tokens). Runs on embed's device.

    Two figures, because serving sees the second: mean_accept_len = 1 + sum_j P(depth j), the mean over
    every answer position (per position); tokens_per_verify[s - 1], for chains of s <= steps steps, the
    tokens per verify of a greedy run over each answer's first `first_tokens` tokens, which verifies only
    where the previous verify left off (after a long accepted run, not inside it), so per verify is
    lower wherever easy stretches are long."""
    accepted, positions, in_vocab = torch.zeros(steps, device=embed.device), 0, 0
    emitted, verifies = [0] * steps, [0] * steps
    for start in range(0, len(seqs), batch_size):
        batch = collate(seqs[start:start + batch_size], embed.device)
        T = batch["ids"].shape[1]
        idx, greedy = torch.arange(T, device=embed.device), batch["greedy"].flatten()
        ok = ((idx >= batch["plen"][:, None] - 1) & (idx + 1 + steps < batch["len"][:, None])).flatten()
        scored = ok.clone()
        depth = torch.zeros(ok.shape, dtype=torch.long, device=embed.device)   # drafts accepted at each position
        positions += int(ok.sum())
        in_vocab += int(head.t2d[greedy[ok.nonzero().squeeze(1) + 1]].sum())
        for j, rows, logits in unroll(head, embed, batch, steps):
            hit = torch.zeros_like(ok)
            hit[rows] = head.to_target_ids(logits.argmax(-1)) == greedy[rows + 1 + j]
            ok &= hit
            depth += ok
            accepted[j] += ok.sum()
        scored, depth = scored.view(-1, T).tolist(), depth.view(-1, T).tolist()
        for b, first in enumerate((batch["plen"] - 1).tolist()):
            for s in range(steps):   # walk the answer as a static chain of s + 1 steps serves it
                t = first
                while t < T and scored[b][t] and t - first < first_tokens:
                    a = min(depth[b][t], s + 1)
                    emitted[s] += a + 1
                    verifies[s] += 1
                    t += a + 1
    rate = (accepted / max(positions, 1)).tolist()
    return {"positions": positions, "in_draft_vocab": in_vocab / max(positions, 1), "depth_acceptance": rate,
            "mean_accept_len": 1 + sum(rate), "tokens_per_verify": [e / max(v, 1) for e, v in zip(emitted, verifies)]}


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def init_head(target, cfg: RunConfig, vocab_ids: torch.Tensor) -> Eagle3DraftHead:
    """Random decoder layer; lm_head rows and final norm copied from the target for the draft vocabulary,
    so the head starts out speaking the target's output space (minutes of CPU training, not hours).
    Built in float32 on the CPU from the seed, so it starts the same whatever device trains it."""
    torch.manual_seed(cfg.seed)
    config = Eagle3Config.for_target(target.config, cfg.draft_vocab_size, cfg.intermediate_size, cfg.aux_layer_ids)
    head = Eagle3DraftHead(config)
    for p in head.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.02)
    head.set_vocab(vocab_ids)
    with torch.no_grad():
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[vocab_ids.to(target.device)])
        head.norm.weight.copy_(target.get_decoder().norm.weight)
    return head


def to_cpu(obj):
    """A (nested) state dict with every tensor on the CPU: saved state then loads on any device."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def train(head, embed, train_seqs, cfg: RunConfig, work: pathlib.Path, run_key: str) -> float:
    """AdamW over random batches on the device of head and embed; batch k depends only on (seed, k),
    so a resumed run repeats exactly (on another device, up to that device's arithmetic).
    Returns the training time in seconds, summed over the interrupted and resumed parts."""
    to_draft = target_to_draft(head)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    work.mkdir(parents=True, exist_ok=True)
    state_path, step, elapsed = work / "train_state.pt", 0, 0.0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["run_key"] != run_key:
            raise ValueError(f"{state_path} belongs to a different run (config, target or data changed): "
                             f"delete it or pass another --work folder")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state.get("elapsed_s", 0.0)
    start = time.time()
    bar = tqdm(range(step, cfg.train_steps), initial=step, total=cfg.train_steps, desc="train")
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        pick = torch.randint(len(train_seqs), (cfg.batch_size,), generator=gen).tolist()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_fn(head, embed, collate([train_seqs[i] for i in pick], embed.device), to_draft, cfg)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.train_steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"run_key": run_key, "step": step + 1, "head": to_cpu(head.state_dict()),
                        "opt": to_cpu(opt.state_dict()), "elapsed_s": elapsed + time.time() - start}, tmp)
            tmp.replace(state_path)
    return elapsed + time.time() - start


def report(out: pathlib.Path, command: str, cfg: RunConfig, results: dict) -> None:
    """README.md next to the checkpoint: how to rebuild it and what it achieves on held-out prompts."""
    per_verify = min(3, cfg.eval_steps)   # the chain SGLang's users run most (3 steps, topk 1)
    lines = [
        "# EAGLE-3 draft head", "",
        "SGLang `LlamaForCausalLMEagle3` layout (`--speculative-algorithm EAGLE3 --speculative-draft-model-path "
        "this-folder`); the portable engine loads it with `sglang_cascade.drafters.eagle3.Eagle3DraftHead.from_pretrained`.", "",
        "Rebuild (from the repository root):", "", "```", command, "```", "",
        f"Training took {results['train_minutes']:.1f} min on {results['machine']} (target answers and features: "
        f"{results['data_minutes']:.1f} min in the last invocation, 0 when cached) "
        f"({results['date']}); target `{results['target']}` ({results['target_dtype']}, config+weights sha256 "
        f"{results['target_digest']}); "
        f"draft vocab {cfg.draft_vocab_size}, intermediate {cfg.intermediate_size}, aux layers "
        f"{results['aux_layer_ids']}, {cfg.train_steps} steps x {cfg.batch_size} sequences, "
        f"unroll {cfg.ttt_steps}.", "",
        f"Held-out teacher-forced greedy chain acceptance ({cfg.n_heldout} prompts per workload, up to "
        f"{cfg.max_new_tokens} answer tokens): P(depth j) = draft steps 1..j all equal the target's greedy "
        f"tokens; mean accept length = 1 + sum_j P(depth j) for steps {cfg.eval_steps}, topk 1. The figures "
        f"describe this head on this target's own answers: a target that repeats itself is easy to predict. "
        f"'untrained': the same head at initialisation (trained layers random), for comparison. Mean accept "
        f"length is per position (every answer position scored); tokens per verify is what serving sees: a "
        f"greedy static chain run over each answer's first 256 tokens, verifying where the last verify left "
        f"off (bonus token included).", "",
        "| workload | positions | next token in draft vocab | "
        + " | ".join(f"P(depth {j + 1})" for j in range(cfg.eval_steps))
        + f" | mean accept length (per position) | untrained | tokens per verify, {per_verify} steps | "
        f"tokens per verify, {cfg.eval_steps} steps |",
        "|---" * (cfg.eval_steps + 7) + "|",
    ]
    for w, r in results["heldout"].items():
        lines.append(f"| {w} | {r['positions']} | {r['in_draft_vocab']:.3f} | "
                     + " | ".join(f"{a:.3f}" for a in r["depth_acceptance"])
                     + f" | {r['mean_accept_len']:.2f} | {results['heldout_untrained'][w]['mean_accept_len']:.2f} | "
                     f"{r['tokens_per_verify'][per_verify - 1]:.2f} | {r['tokens_per_verify'][-1]:.2f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target model folder, or 'default' for the embedded MoE")
    ap.add_argument("--out", required=True, help="where the SGLang-layout head is written")
    ap.add_argument("--config", help="run.json with RunConfig fields (defaults otherwise)")
    ap.add_argument("--work", default="runs/eagle3", help="caches and resumable training state")
    ap.add_argument("--device", default="auto",
                    help="auto (a CUDA GPU when torch sees one, else cpu), cpu, cuda or cuda:N: where the target "
                         "and the head run")
    ap.add_argument("--target-dtype", default="auto", choices=["auto", *TARGET_DTYPES],
                    help="dtype the target runs in; auto: bfloat16 on a GPU, float32 on the CPU (the head always "
                         "trains in float32)")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    dtype = target_dtype(args.target_dtype, device)
    t0 = time.time()
    cfg = RunConfig.load(args.config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    target, tokenizer, target_digest = load_target(args.target, device, dtype)
    # caches hold what the target computes, and that depends on its dtype; float32 (the only dtype before
    # --target-dtype) keeps the bare digest, so caches of earlier runs stay valid
    dtype_name = str(dtype).removeprefix("torch.")
    target_key = target_digest if dtype == torch.float32 else f"{target_digest}-{dtype_name}"
    aux_ids = Eagle3Config.for_target(target.config, cfg.draft_vocab_size,
                                      aux_layer_ids=cfg.aux_layer_ids).aux_layer_ids
    fields = dataclasses.asdict(cfg)
    data_fields = [fields[k] for k in ("seed", "workloads", "prompt_files", "n_train", "n_heldout", "max_new_tokens")]
    data_key = _key([target_key, data_fields, aux_ids])
    run_key = _key([data_key, {k: v for k, v in fields.items() if k not in ("threads", "save_every")}])
    feats_path = work / f"features-{data_key}.pt"
    if feats_path.is_file():
        feats = torch.load(feats_path, weights_only=False)
    else:
        feats = {}
        for w in cfg.workloads:
            texts = data.distilled(target, tokenizer, target_key, w, cfg.n_train, cfg.n_heldout, cfg.seed,
                                   cfg.max_new_tokens, cfg.gen_batch_size, work / "data", cfg.prompt_files)
            feats[w] = {split: target_features(target, seqs, aux_ids, cfg.gen_batch_size, f"{w}/{split} features")
                        for split, seqs in texts.items()}
        torch.save(feats, feats_path)
    data_minutes = (time.time() - t0) / 60
    train_seqs = [s for w in cfg.workloads for s in feats[w]["train"]]
    head = init_head(target, cfg, draft_vocab(train_seqs, target.config.vocab_size, cfg.draft_vocab_size)).to(device)
    embed = target.get_input_embeddings().weight.detach().float()
    del target
    gc.collect()  # the target's memory (on a GPU: tens of GB) goes to the head's training

    with torch.no_grad():
        untrained = {w: chain_acceptance(head, embed, feats[w]["heldout"], cfg.eval_steps) for w in cfg.workloads}
    train_seconds = train(head, embed, train_seqs, cfg, work, run_key)
    head.eval()
    results = {
        "target": args.target, "target_digest": target_digest, "target_dtype": dtype_name, "aux_layer_ids": aux_ids,
        "date": time.strftime("%Y-%m-%d"),
        "machine": (f"{torch.cuda.get_device_name(device)} GPU ({device})" if device.type == "cuda" else
                    f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch threads"),
        "train_minutes": train_seconds / 60, "data_minutes": data_minutes,
        "heldout": {w: chain_acceptance(head, embed, feats[w]["heldout"], cfg.eval_steps) for w in cfg.workloads},
        "heldout_untrained": untrained,
    }
    head.save_pretrained(out)
    record_head_target(out, target_digest)   # loaders compare it with the target they pair the head with
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python -m sglang_cascade.training.train_eagle3 " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report(out, command, cfg, results)
    for w, r in results["heldout"].items():
        print(f"{w:>10}: mean accept length {r['mean_accept_len']:.2f}  depth acceptance "
              + " ".join(f"{a:.2f}" for a in r["depth_acceptance"]))
    return results


if __name__ == "__main__":
    main()
