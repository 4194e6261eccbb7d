"""The portable speculative engine: continuous batching, per-request EAGLE trees, one target verify
for the whole batch, lossless acceptance, and the Cascade controller (or, in --mode adaptive, SGLang's
adaptive-steps policy as a baseline) in the loop."""

from __future__ import annotations

import pathlib
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglang_cascade import drafters
from sglang_cascade.drafters.eagle3 import Eagle3DraftHead
from sglang_cascade.controller import PLAIN, CascadeController, MoECostModel, MoEShape, SpecPolicy
from sglang_cascade.controller.cost_model import machine_balance
from sglang_cascade.controller.session import RequestFigures, SpecSession
from sglang_cascade.engine.acceptance import accept_greedy, accept_sampling, target_probs
from sglang_cascade.engine.config import EngineConfig, GenerationRequest, StepOutput, check_draft_head
from sglang_cascade.engine.drafting import DraftJob, TreeDrafter
from sglang_cascade.engine.kv_cache import RequestCache
from sglang_cascade.engine.target import Segment, TargetModel
from sglang_cascade.engine.tree import DraftTree
from sglang_cascade.target_digest import check_pair

DEFAULT_HEAD_DIR = pathlib.Path(drafters.__file__).parent / "checkpoints" / "default"


@dataclass
class _Running:
    req: GenerationRequest
    tokens: list[int]                   # prompt + output; tokens[cache.target.cached] is the root
    cache: RequestCache
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)


def moe_shape(config, head: Eagle3DraftHead | None, weight_dtype: torch.dtype = torch.float32,
              kv_dtype: torch.dtype = torch.float64) -> MoEShape:
    """The cost model's view of a Mixtral-class target (the CPU path's defaults: float32 weights,
    float64 KV cache)."""
    return MoEShape.from_config(config, draft_params=sum(p.numel() for p in head.parameters()) if head else 0,
                                bytes_per_param=weight_dtype.itemsize, kv_bytes_per_value=kv_dtype.itemsize)


class Engine:
    def __init__(self, cfg: EngineConfig, model=None, head: Eagle3DraftHead | None = None, tokenizer=None):
        """Loads the target and head from cfg's paths; tests may pass already-built ones."""
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        device = cfg.torch_device()
        self.target_path = cfg.target_path or (None if model is not None else str(default_target_path()))
        if model is None and cfg.mode != "plain" and head is None:   # before the weights load
            print(f"sglang-cascade: {check_pair(self.target_path, head_dir(cfg.draft_path), cfg.strict_target_hash)}",
                  file=sys.stderr, flush=True)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(self.target_path, dtype=cfg.torch_dtype(device))
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.target_path)
        self.tokenizer = tokenizer
        if cfg.mode != "plain" and head is None:
            head = load_head(cfg.draft_path, model.config)
        self.head = head.to(device) if cfg.mode != "plain" else None
        self.capacity = cfg.max_context + cfg.max_tree()
        self.target = TargetModel(model.to(device), self.capacity,
                                  self.head.config.aux_layer_ids if self.head else None, cfg.attention_backend)
        self.drafter = TreeDrafter(self.head, self.target.embed_tokens, self.capacity) if self.head else None
        self.controller: SpecPolicy | None = None   # CascadeController or SGLangAdaptivePolicy
        if cfg.mode == "cascade":
            shape = moe_shape(model.config, self.head, self.target.dtype, self.target.tree_attention.kv_dtype)
            balance = machine_balance(device.type)
            self.controller = CascadeController(cfg.cascade, MoECostModel(shape, flops_per_byte=balance))
        elif cfg.mode == "adaptive":
            self.controller = cfg.adaptive_policy()
        self.iteration_log: deque[dict] = deque(maxlen=100_000)   # one line per iteration (SpecSession's format)
        default = cfg.static_config if cfg.mode == "static" else PLAIN
        self.session = SpecSession(self.controller, default, log=self.iteration_log.append)
        eos = model.generation_config.eos_token_id if model.generation_config else model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.waiting: deque[GenerationRequest] = deque()
        self.running: dict[str, _Running] = {}

    # -- API ------------------------------------------------------------------------------------
    def model_info(self) -> dict:
        return {"model_path": self.target_path, "is_generation": True, "tokenizer_path": self.target_path,
                "draft_model_path": (self.cfg.draft_path or str(DEFAULT_HEAD_DIR)) if self.head else None,
                "model_type": self.target.config.model_type}

    def server_info(self) -> dict:
        cfg = self.cfg
        return {"mode": cfg.mode, "static_config": cfg.static_config.label() if cfg.static_config else None,
                "cascade": " ".join(cfg.cascade.to_cli_args()) if cfg.mode == "cascade" else None,
                "adaptive": ({"initial_steps": cfg.adaptive_initial_steps,
                              "config": cfg.adaptive_config or "sglang-default"} if cfg.mode == "adaptive" else None),
                "max_running_requests": cfg.max_batch, "context_length": cfg.max_context, "seed": cfg.seed}

    def validate(self, req: GenerationRequest) -> None:
        n = len(req.input_ids)
        if n == 0:
            raise ValueError("empty prompt: give `text` or `input_ids` with at least one token")
        bad = [t for t in req.input_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise ValueError(f"input_ids {bad[:5]} outside the vocabulary [0, {self.target.vocab_size})")
        req.sampling.validate()
        if n + req.sampling.max_new_tokens > self.cfg.max_context:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({req.sampling.max_new_tokens}) exceeds "
                             f"the context length {self.cfg.max_context}; lower max_new_tokens or start "
                             f"the server with a larger --context-length")
        if req.spec is not None and req.spec.speculative:
            if self.head is None:
                raise ValueError("this engine runs --mode plain (no draft head): it cannot speculate")
            if req.spec.draft_tokens > self.cfg.max_tree():
                raise ValueError(f"speculative config {req.spec.label()} verifies {req.spec.draft_tokens} tokens, "
                                 f"more than this engine's largest configuration ({self.cfg.max_tree()})")
        if req.rid in self.running or any(w.rid == req.rid for w in self.waiting):
            raise ValueError(f"request id {req.rid!r} is already in use")

    def add_request(self, req: GenerationRequest) -> None:
        self.validate(req)
        self.waiting.append(req)

    def abort(self, rid: str) -> None:
        self.waiting = deque(r for r in self.waiting if r.rid != rid)
        if self.running.pop(rid, None) is not None:
            self.session.finish(rid)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[StepOutput]:
        """Admit and prefill waiting requests, then run one draft + verify iteration for the batch."""
        outputs = self._admit()
        if self.running:
            outputs += self._iterate()
        return outputs

    # -- internals ------------------------------------------------------------------------------
    def _admit(self) -> list[StepOutput]:
        new = []
        while self.waiting and len(self.running) + len(new) < self.cfg.max_batch:
            req = self.waiting.popleft()
            seed = req.sampling.seed if req.sampling.seed is not None else self.cfg.seed + zlib.crc32(req.rid.encode())
            cache = RequestCache(self.target.new_cache(self.capacity),
                                 self.head.config.hidden_size if self.head else None,
                                 self.drafter.new_cache() if self.drafter else None)
            new.append(_Running(req, list(req.input_ids), cache, torch.Generator().manual_seed(seed)))
        if not new:
            return []
        segments = []
        for run in new:
            tree = DraftTree.chain(run.tokens)
            segments.append(Segment(run.cache.target, torch.tensor(run.tokens), torch.arange(len(run.tokens)),
                                    tree.ancestor_mask(), torch.tensor([len(run.tokens) - 1])))
        result = self.target.forward(segments)
        outputs = []
        for run, logits, aux in zip(new, result.logits, result.aux_hidden):
            n = len(run.tokens)
            self._store_features(run, aux, list(range(n)))
            run.cache.target.cached = n
            self.running[run.req.rid] = run
            self.session.add(run.req.rid, pinned=run.req.spec)
            out = self._emit(run, [self._sample(run, DraftTree.root_only(run.tokens[-1]), logits)[1]])
            if out.finished:
                self._finish(run.req.rid)
            outputs.append(out)
        return outputs

    def _iterate(self) -> list[StepOutput]:
        rids = list(self.running)
        configs = dict(zip(rids, self.session.begin(rids, [self.running[r].cache.target.cached for r in rids])))
        start = time.perf_counter()
        trees = {rid: DraftTree.root_only(self.running[rid].tokens[-1]) for rid in rids}
        jobs = {rid: DraftJob(self.running[rid].cache, self.running[rid].tokens, configs[rid])
                for rid in rids if configs[rid].speculative}
        if jobs:
            trees.update(zip(jobs, self.drafter.draft(list(jobs.values()))))
        draft_time = time.perf_counter() - start
        segments = []
        for rid in rids:
            tree = trees[rid]
            segments.append(Segment(self.running[rid].cache.target, torch.tensor(tree.tokens),
                                    torch.tensor(tree.depths()), tree.ancestor_mask(), torch.arange(len(tree))))
        result = self.target.forward(segments)
        accepted, emitted = [], []
        for rid, seg, logits, aux in zip(rids, segments, result.logits, result.aux_hidden):
            run, tree = self.running[rid], trees[rid]
            path, bonus = self._sample(run, tree, logits)
            self._store_features(run, aux, path, offset=seg.cache.cached)
            seg.cache.commit(path)
            accepted.append(len(path) - 1)
            emitted.append([tree.tokens[i] for i in path[1:]] + [bonus])
        self.session.complete(accepted, tokens_verified=[len(trees[rid]) for rid in rids],
                              distinct_experts=result.distinct_experts, draft_s=draft_time)
        outputs = [self._emit(self.running[rid], tokens) for rid, tokens in zip(rids, emitted)]
        for out in outputs:
            if out.finished:
                self._finish(out.rid)
        return outputs

    def _sample(self, run: _Running, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        if run.req.sampling.greedy:
            return accept_greedy(tree, logits)
        return accept_sampling(tree, target_probs(logits, run.req.sampling), run.generator)

    def _store_features(self, run: _Running, aux: torch.Tensor | None, rows: list[int], offset: int = 0) -> None:
        if self.head is not None:
            with torch.no_grad():
                run.cache.features[offset:offset + len(rows)] = self.head.fuse(aux[rows].float())

    def _emit(self, run: _Running, tokens: list[int]) -> StepOutput:
        """Append accepted tokens up to a stop token or the length limit."""
        sp = run.req.sampling
        stops = set(sp.stop_token_ids or []) | (set() if sp.ignore_eos else self.eos_ids)
        new, reason = [], None
        for tok in tokens:
            new.append(tok)
            if tok in stops:
                reason = {"type": "stop", "matched": tok}
                break
            if len(run.output_ids) + len(new) >= sp.max_new_tokens:
                reason = {"type": "length", "length": sp.max_new_tokens}
                break
        run.output_ids += new
        run.tokens += new
        return StepOutput(run.req.rid, new, reason is not None, reason, self._meta(run))

    def _meta(self, run: _Running) -> dict:
        done, rid = len(run.output_ids), run.req.rid
        fig = self.session.figures.get(rid) or RequestFigures()
        verifies = fig.iterations
        meta = {"prompt_tokens": len(run.req.input_ids), "completion_tokens": done,
                "spec_verify_ct": verifies, "spec_accepted_drafts": fig.drafts_accepted,
                "spec_accept_length": (done - 1) / verifies if verifies else 0.0,
                "spec_share_speculating": fig.speculative_iterations / verifies if verifies else 0.0,
                "spec_config": fig.config}
        snapshot = self.session.snapshot(rid)
        if snapshot is not None:   # the policy's requests: meta["cascade"] or meta["adaptive"]
            meta[self.cfg.mode] = snapshot
        return meta

    def _finish(self, rid: str) -> None:
        self.running.pop(rid)
        self.session.finish(rid)


def default_target_path() -> pathlib.Path:
    from sglang_cascade.models.default_model import ensure_default_moe
    return ensure_default_moe()


def head_dir(path: str | None) -> pathlib.Path:
    return pathlib.Path(path) if path else DEFAULT_HEAD_DIR


def load_head(path: str | None, target_config) -> Eagle3DraftHead:
    folder = head_dir(path)
    check_draft_head(folder)
    return Eagle3DraftHead.from_pretrained(folder, target_config=target_config)
