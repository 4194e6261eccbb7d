"""Acceptance traces: what every ladder configuration would accept at every position of a greedy
continuation, recorded once with the real target and head, so policies can be replayed without them.

Why this is enough: greedy verification is a pure function of the prefix. At each position of the
target's greedy continuation this drafts, with the engine's own TreeDrafter, the longest chain any
policy may ask for (CHAIN_STEPS, topk 1: every shorter chain is its prefix, the EAGLE top-1 chain) and
each tree configuration of the ladder, merges them into one tree (nodes keyed by their token path),
verifies that tree in one TargetModel forward, and reads each configuration's acceptance with the
engine's accept_greedy on its own nodes' rows. The root row's argmax is the next greedy token; only
the root is committed, so the walk is plain greedy decoding.

Per position it keeps: the chain's accepted length, each tree's accepted length, the chain's per-step
draft probabilities (the draft's confidences), and each verified token's routed experts per layer as
a bitmask (root, chain nodes, and the union over each tree's nodes), from which a replay forms the
distinct experts of any batch. Routing is read by re-running the router on the MoE layers' inputs;
its union over the forward is checked against TargetModel.forward's own distinct_experts.

    .venv/bin/python -m evals.replay.traces --prompts 4 --positions 128 --out evals/replay/data/full.json.gz
    .venv/bin/python -m evals.replay.traces --ci          # the small trace CI reads (2 prompts x 24)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import pathlib
import sys
import time

import torch
from tqdm import tqdm

from sglang_cascade import workloads
from sglang_cascade.controller import CascadeConfig, SpecConfig
from sglang_cascade.engine.acceptance import accept_greedy
from sglang_cascade.engine.batch_invariant import linear
from sglang_cascade.engine.config import EngineConfig
from sglang_cascade.engine.drafting import DraftJob
from sglang_cascade.engine.engine import Engine
from sglang_cascade.engine.kv_cache import RequestCache
from sglang_cascade.engine.target import Segment, TargetModel
from sglang_cascade.engine.tree import DraftTree
from sglang_cascade.target_digest import head_target_digest, target_digest

DATA = pathlib.Path(__file__).parent / "data"
CI_TRACE = DATA / "ci_trace.json.gz"
FULL_TRACE = DATA / "full_trace.json.gz"
CHAIN_STEPS = 7    # SGLang's adaptive policy drafts chains of up to 7 at batch 1; vLLM's default block is 7
FORMAT = 1


class RoutingTarget(TargetModel):
    """TargetModel that also keeps each row's routed experts per layer (bitmask of the top-k)."""

    def forward(self, segments):
        self.routing = []
        return super().forward(segments)

    def _moe(self, moe, x):
        out, used = super()._moe(moe, x)
        # the router of TargetModel._moe, re-run: Mixtral routing picks the top-k of the gate's logits
        experts = torch.topk(torch.softmax(linear(x, moe.gate.weight).float(), dim=-1), self.top_k, dim=-1).indices
        self.routing.append((1 << experts).sum(-1).tolist())
        return out, used


def tree_configs(ladder) -> list[SpecConfig]:
    """The ladder's configurations that are not prefixes of the top-1 chain."""
    return [c for c in ladder if c.speculative and c.topk > 1]


def _merge(trees: list[DraftTree]) -> tuple[DraftTree, list[list[int]]]:
    """One tree holding every node of `trees` (same token path = same node); each tree's node rows in it."""
    tokens, parents, index = [trees[0].tokens[0]], [-1], {(): 0}
    rows = []
    for tree in trees:
        paths, mine = [()], [0]
        for node in range(1, len(tree)):
            path = paths[tree.parents[node]] + (tree.tokens[node],)
            paths.append(path)
            if path not in index:
                index[path] = len(tokens)
                tokens.append(tree.tokens[node])
                parents.append(index[path[:-1]])
            mine.append(index[path])
        rows.append(mine)
    return DraftTree(tokens, parents), rows


def _bits(masks: list[int]) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def record_prompt(engine: Engine, target: RoutingTarget, ids: list[int], positions: int, trees_cfg, bar) -> dict:
    """Greedy-decode one prompt for `positions` tokens, recording every position (see module doc)."""
    head, drafter = engine.head, engine.drafter
    cache = RequestCache(target.new_cache(engine.capacity), head.config.hidden_size, drafter.new_cache())
    configs = [SpecConfig(CHAIN_STEPS), *trees_cfg]
    caches = [cache] + [RequestCache(cache.target, None, drafter.new_cache()) for _ in trees_cfg]
    for c in caches[1:]:
        c.features = cache.features
    tokens = list(ids)
    t0 = time.perf_counter()
    result = target.forward([Segment(cache.target, torch.tensor(tokens), torch.arange(len(tokens)),
                                     DraftTree.chain(tokens).ancestor_mask(), torch.tensor([len(tokens) - 1]))])
    prefill_s = time.perf_counter() - t0
    with torch.no_grad():
        cache.features[:len(tokens)] = head.fuse(result.aux_hidden[0].float())
    cache.target.cached = len(tokens)
    tokens.append(int(result.logits[0].argmax()))   # the prefill's token: position 0's root
    eos = engine.eos_ids
    out = {"prompt_tokens": len(ids), "prefill_s": prefill_s, "tokens": [tokens[-1]], "chain_accept": [],
           "tree_accept": [], "confidence": [], "experts_root": [], "experts_chain": [], "experts_tree": [],
           "checked_forwards": 0}
    for _ in range(positions):
        if tokens[-1] in eos:
            break
        jobs = [DraftJob(c, tokens, cfg) for c, cfg in zip(caches, configs)]
        drafts = drafter.draft(jobs)
        merged, rows = _merge(drafts)
        result = target.forward([Segment(cache.target, torch.tensor(merged.tokens), torch.tensor(merged.depths()),
                                         merged.ancestor_mask(), torch.arange(len(merged)))])
        routing = [list(layer) for layer in zip(*target.routing)]   # per node: per layer mask
        if [bin(_bits(layer)).count("1") for layer in target.routing] != result.distinct_experts:
            raise RuntimeError("recorded routing disagrees with TargetModel.forward's distinct_experts")
        out["checked_forwards"] += 1
        logits = result.logits[0]
        accepted = [len(accept_greedy(tree, logits[mine])[0]) - 1 for tree, mine in zip(drafts, rows)]
        scores = [c.score for c in jobs[0].candidates]
        out["chain_accept"].append(accepted[0])
        out["tree_accept"].append(accepted[1:])
        out["confidence"].append([round(math.exp(b - a), 5)
                                  for a, b in zip([0.0] + scores[:-1], scores)])
        out["experts_root"].append(routing[0])
        out["experts_chain"].append([routing[r] for r in rows[0][1:]])
        out["experts_tree"].append([[_bits(layer) for layer in zip(*(routing[r] for r in mine))] for mine in rows[1:]])
        cache.target.commit([0])
        with torch.no_grad():
            cache.features[cache.target.cached - 1] = head.fuse(result.aux_hidden[0][0:1].float())[0]
        tokens.append(int(logits[0].argmax()))
        out["tokens"].append(tokens[-1])
        bar.update()
    return out


def record(prompts_per_workload: int, positions: int, seed: int = 0, ladder=None) -> dict:
    torch.set_num_threads(1)
    ladder = ladder or CascadeConfig().ladder
    trees_cfg = tree_configs(ladder)
    engine = Engine(EngineConfig(mode="static", static_config=SpecConfig(CHAIN_STEPS), max_batch=1, threads=1))
    base = engine.target
    target = RoutingTarget(base.model, engine.capacity, base.aux_layer_ids)
    cfg = target.config
    draft_params = sum(p.numel() for p in engine.head.parameters())
    requests = []
    todo = [(w, form, p) for w in workloads.SERVED
            for form, texts in [workloads.served_prompts(w, "heldout", prompts_per_workload, seed)] for p in texts]
    with tqdm(total=len(todo) * positions, desc="trace positions") as bar:
        for w, form, text in todo:
            t0 = time.process_time()
            entry = record_prompt(engine, target, workloads.request_ids(engine.tokenizer, form, text),
                                  positions, trees_cfg, bar)
            entry.update(workload=w, prompt_sha=hashlib.sha256(text.encode()).hexdigest()[:12],
                         cpu_s=time.process_time() - t0)
            requests.append(entry)
    return {"format": FORMAT, "chain_steps": CHAIN_STEPS, "trees": [c.label() for c in trees_cfg],
            "ladder": [c.label() for c in ladder], "positions": positions, "prompts_per_workload": prompts_per_workload,
            "seed": seed, "target": {"digest": target_digest(engine.target_path), "num_layers": cfg.num_hidden_layers,
                                     "num_experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok,
                                     "config": {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str))}},
            "head": {"path": _repo_relative(engine.model_info()["draft_model_path"]), "draft_params": draft_params,
                     "trained_on": head_target_digest(engine.model_info()["draft_model_path"])},
            "requests": requests}


def _repo_relative(path: str) -> str:
    root = pathlib.Path(__file__).resolve().parents[2]
    p = pathlib.Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def save(trace: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(trace, f, separators=(",", ":"))


def load(path: pathlib.Path = CI_TRACE) -> dict:
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    if trace.get("format") != FORMAT:
        raise ValueError(f"{path}: trace format {trace.get('format')}, this code reads {FORMAT}; re-record it "
                         f"with python -m evals.replay.traces")
    return trace


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts per workload")
    ap.add_argument("--positions", type=int, default=128, help="greedy positions recorded per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(FULL_TRACE))
    ap.add_argument("--ci", action="store_true", help="the CI trace: 2 prompts x 24 positions into " + str(CI_TRACE))
    args = ap.parse_args(argv)
    if args.ci:
        args.prompts, args.positions, args.out = 2, 24, str(CI_TRACE)
    t0 = time.perf_counter()
    trace = record(args.prompts, args.positions, args.seed)
    trace["wall_s"] = time.perf_counter() - t0
    save(trace, pathlib.Path(args.out))
    print(f"wrote {args.out}: {len(trace['requests'])} prompts, "
          f"{sum(len(r['chain_accept']) for r in trace['requests'])} positions in {trace['wall_s']:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
