"""One script for the checks that need a GPU, ready for a machine with one H100 or H200 and no internet.

    python evals/gpu_check.py --device cuda            # the GPU run (about 4-6 minutes)
    python evals/gpu_check.py --device cpu --quick     # smoke run of the same code at tiny sizes (CPU)

Why: everything else in this project ran on CPUs. These are the GPU claims the code makes, checked
where they matter, with only torch (and, for part 2, the project's transformers/safetensors/tqdm) on
the machine: no SGLang, no FlashInfer, no model download.

1. moe_bench: evals/gpu_moe_bench.py at Qwen3-30B-A3B's MoE shapes (torch per-expert impl): verify
   time against tokens verified and distinct experts, beside a data-movement prediction (distinct
   experts x expert bytes + dense bytes, over the GPU's HBM bandwidth). Measures; checks nothing.
2. engine: the portable engine in bf16 (--attention-backend torch; also flashinfer where it imports)
   on a random Mixtral-class target built here (the default MoE's source weights cannot travel) and an
   EAGLE-3 head trained here on that target's own greedy outputs with sglang_cascade/training/train_eagle3.py's
   functions. Modes plain, static chain, static tree and cascade on held-out prompts: tokens/s,
   accept lengths, and greedy equality with plain under a near-tie standard (see engine_part).
3. pruned_experts: PrunedExperts.rewrite (sglang_cascade/plugin/pruned_experts.py) against a torch
   reference of SGLang's fused-MoE semantics: kept rows unchanged, cut rows load no experts; on CUDA
   also its -1/weight-0 convention and CUDA-graph replay; its import pulls in no sglang.

With --device cpu every part runs on the CPU (part 3 then exercises the rewrite's CPU variant, not
the CUDA convention, and skips the graph checks). Each part runs in its own try block. Writes
evals/results/<out>.{json,md} (and the bench's own <out>_moe_bench.{json,md}); exits 1 when a check
fails or a part raises, 0 otherwise (a part skipped for a missing package is listed, not failed).
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import NamedTuple

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.common import RESULTS, provenance, write  # noqa: E402

PARTS = ("moe_bench", "engine", "pruned_experts")

# HBM bandwidth by product (vendor datasheets; H100 and H200 without a suffix are the SXM parts).
HBM_TBPS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35))


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def hbm_bandwidth(device_name: str, override_tbps: float | None) -> tuple[float | None, str]:
    """(bytes/s, where the figure comes from); None off the GPUs named in HBM_TBPS."""
    if override_tbps:
        return override_tbps * 1e12, f"--hbm-tbps {override_tbps}"
    for key, tbps in HBM_TBPS:
        if all(word in device_name for word in key.split()):
            return tbps * 1e12, f"{key} datasheet, {tbps} TB/s"
    return None, f"no HBM figure for {device_name!r} (pass --hbm-tbps)"


# ---------------------------------------------------------------------------------------------- part 1
def moe_bench_part(args, device: torch.device, device_name: str, results_dir: pathlib.Path) -> dict:
    """Runs gpu_moe_bench.main and sets its measured verify times beside a bytes-moved prediction.

    The bench has no data-movement model of its own (it reports achieved expert GB/s), so the
    prediction is made here: layers x (distinct experts x expert bytes) + dense bytes, over HBM
    bandwidth. Its stack holds no attention or router weights (routing is precomputed on the host),
    so the dense term is the activations read and written (2 x tokens x hidden per layer)."""
    from evals import gpu_moe_bench

    if args.quick:
        shape = ["--layers", "1", "--experts", "16", "--top-k", "4", "--hidden", "256", "--expert-width", "128",
                 "--tokens", "1,4,16", "--locality", "0,2", "--reps", "3"]
    else:   # Qwen3-30B-A3B's MoE shapes (the bench's defaults), 4 of its 48 layers (~4.7 GB of bf16 experts)
        shape = ["--layers", "4", "--tokens", "1,2,3,4,6,8,12,16,24,32,48,64", "--locality", "0,2", "--reps", "10"]
    bench = gpu_moe_bench.main(["--device", str(device), "--impl", "torch", *shape, "--out", f"{args.out}_moe_bench",
                                "--results-dir", str(results_dir)])
    a = bench["args"]
    itemsize = 2 if device.type == "cuda" else 4    # the bench runs bf16 on CUDA, float32 on the CPU
    expert_bytes = 3 * a["hidden"] * a["expert_width"] * itemsize
    bandwidth, source = hbm_bandwidth(device_name, args.hbm_tbps) if device.type == "cuda" else (None, "CPU run")
    rows = []
    for r in bench["results"]:
        moved = a["layers"] * (r["distinct_experts"] * expert_bytes + 2 * r["tokens"] * a["hidden"] * itemsize)
        predicted_ms = 1000 * moved / bandwidth if bandwidth else None
        rows.append({**r, "bytes_moved": moved, "predicted_ms": predicted_ms,
                     "measured_over_predicted": r["ms"] / predicted_ms if predicted_ms else None})
    ms = [r["ms"] for r in rows]
    distinct = [r["distinct_experts"] for r in rows]
    fit = {}
    try:   # verify time against each feature: which one it follows
        slope, intercept = statistics.linear_regression(distinct, ms)
        fit = {"ms_per_distinct_expert_per_layer": slope, "ms_intercept": intercept,
               "r_ms_vs_distinct_experts": statistics.correlation(distinct, ms),
               "r_ms_vs_tokens": statistics.correlation([float(r["tokens"]) for r in rows], ms)}
    except statistics.StatisticsError as e:
        fit = {"error": str(e)}
    return {"status": "ok", "bench_args": a, "expert_bytes": expert_bytes, "hbm_bytes_per_s": bandwidth,
            "hbm_source": source, "rows": rows, "fit": fit,
            "note": "impl torch: a per-expert loop with a host sync per expert, so small batches are launch-bound; "
                    "measured/predicted > 1 there says so, not that bytes do not set the cost"}


# ---------------------------------------------------------------------------------------------- part 2
class EngineSizes(NamedTuple):
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    experts: int
    aux_layer_ids: list
    train_prompts: int
    heldout_prompts: int
    answer_tokens: int
    draft_vocab: int
    head_intermediate: int
    ttt_steps: int
    batch_size: int
    probe_steps: int        # timed first, to fit the real run into train_seconds (0: train max_steps)
    max_steps: int
    eval_prompts: int
    new_tokens: int


GPU_SIZES = EngineSizes(vocab=2048, hidden=512, layers=6, heads=8, kv_heads=4, intermediate=512, experts=16,
                        aux_layer_ids=[1, 3, 4], train_prompts=128, heldout_prompts=16, answer_tokens=96,
                        draft_vocab=1024, head_intermediate=1024, ttt_steps=5, batch_size=16, probe_steps=20,
                        max_steps=3000, eval_prompts=8, new_tokens=64)
CPU_SIZES = EngineSizes(vocab=64, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=32, experts=8,
                        aux_layer_ids=[0, 1, 2], train_prompts=24, heldout_prompts=4, answer_tokens=24,
                        draft_vocab=48, head_intermediate=64, ttt_steps=3, batch_size=8, probe_steps=0,
                        max_steps=40, eval_prompts=4, new_tokens=16)


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (6 + int(torch.randint(0, 10, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def build_target(s: EngineSizes, device: torch.device, dtype: torch.dtype):
    """A random Mixtral (seed 0), built in float32 on the CPU so it is the same on every machine, then
    moved; lm_head scaled x8 as in tests/tiny_models.py, so greedy text is not near-uniform noise."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                        num_local_experts=s.experts, num_experts_per_tok=2, max_position_embeddings=1024,
                        tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model.to(device=device, dtype=dtype)


class _IdTokenizer(NamedTuple):
    """What sglang_cascade.training.data.greedy_answers reads of a tokenizer: the target works on token ids only."""
    pad_token_id: int = 0
    eos_token_id: int | None = None


def train_head(model, s: EngineSizes, train_seconds: float, device: torch.device) -> tuple:
    """An EAGLE-3 head fitted to the target's greedy answers with sglang_cascade/training/train_eagle3.py's own steps
    (answers, aux features, draft vocabulary, init, AdamW unroll, held-out chain acceptance).

    On a GPU a short probe run times a step first, so the real run (a fresh head, its own lr schedule)
    fits train_seconds whatever the card; on the CPU it runs max_steps."""
    from sglang_cascade.training import data as tdata
    from sglang_cascade.training import train_eagle3 as te

    t0 = time.perf_counter()
    tok = _IdTokenizer()
    prompts = random_prompts(s.train_prompts + s.heldout_prompts, s.vocab, seed=1)
    answers = tdata.greedy_answers(model, tok, prompts, s.answer_tokens, batch_size=32, desc="target answers")
    seqs = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    feats = te.target_features(model, seqs, s.aux_layer_ids, 32, "aux features")
    train_seqs, held = feats[:s.train_prompts], feats[s.train_prompts:]
    data_s = time.perf_counter() - t0

    cfg = te.RunConfig(seed=0, draft_vocab_size=s.draft_vocab, intermediate_size=s.head_intermediate,
                       aux_layer_ids=s.aux_layer_ids, ttt_steps=s.ttt_steps, eval_steps=s.ttt_steps,
                       batch_size=s.batch_size, train_steps=s.max_steps, lr=1e-3, warmup_steps=15,
                       save_every=10 ** 9)
    head = te.init_head(model, cfg, te.draft_vocab(train_seqs, s.vocab, s.draft_vocab)).to(device)
    embed = model.get_input_embeddings().weight.detach().float()
    untrained = te.chain_acceptance(head, embed, held, cfg.eval_steps)
    steps, probe = s.max_steps, None
    with tempfile.TemporaryDirectory() as work:
        if s.probe_steps:
            probe_cfg = dataclasses.replace(cfg, train_steps=s.probe_steps)
            probe_s = te.train(copy.deepcopy(head), embed, train_seqs, probe_cfg, pathlib.Path(work) / "probe", "probe")
            probe = {"steps": s.probe_steps, "seconds": probe_s}
            steps = max(50, min(s.max_steps, int(train_seconds * s.probe_steps / probe_s)))
        cfg = dataclasses.replace(cfg, train_steps=steps)
        train_s = te.train(head, embed, train_seqs, cfg, pathlib.Path(work) / "run", "gpu-check")
    head.eval()
    heldout = te.chain_acceptance(head, embed, held, cfg.eval_steps)
    return head, {"data_seconds": data_s, "probe": probe, "train_steps": steps, "train_seconds": train_s,
                  "batch_size": s.batch_size, "ttt_steps": s.ttt_steps, "draft_vocab": s.draft_vocab,
                  "heldout_chain_acceptance": heldout, "heldout_chain_acceptance_untrained": untrained}


def run_engine(engine, prompts: list[list[int]], new_tokens: int, prefix: str = "r") -> tuple:
    """(outputs, metas, wall seconds) of greedy generation of every prompt through engine.step()."""
    from sglang_cascade.engine import GenerationRequest, SamplingParams

    for i, ids in enumerate(prompts):
        engine.add_request(GenerationRequest(f"{prefix}{i}", ids, SamplingParams(max_new_tokens=new_tokens)))
    outs, metas = collections.defaultdict(list), {}
    start = time.perf_counter()
    while engine.has_work():
        for o in engine.step():
            outs[o.rid].extend(o.new_token_ids)
            metas[o.rid] = o.meta
    wall = time.perf_counter() - start
    rids = [f"{prefix}{i}" for i in range(len(prompts))]
    return [outs[r] for r in rids], [metas[r] for r in rids], wall


def record_decode_logits(engine) -> dict:
    """Wraps engine._sample so a plain engine keeps, per request, the logits row each token was taken from."""
    rows = collections.defaultdict(list)
    original = engine._sample

    def sample(run, tree, logits):
        rows[run.req.rid].append(logits[0].clone())
        return original(run, tree, logits)

    engine._sample = sample
    return rows


def prefill_logits(engine, prompts, outputs) -> list[torch.Tensor]:
    """Teacher-forced logits of each output token, all prompts in one forward: plain's arithmetic at
    another batching (many rows per GEMM)."""
    from sglang_cascade.engine.target import Segment
    from sglang_cascade.engine.tree import DraftTree

    segments = []
    for p, out in zip(prompts, outputs):
        seq = p + out[:-1]
        segments.append(Segment(engine.target.new_cache(engine.capacity), torch.tensor(seq), torch.arange(len(seq)),
                                DraftTree.chain(seq).ancestor_mask(), torch.arange(len(p) - 1, len(seq))))
    return engine.target.forward(segments).logits


def gap_shift(a: torch.Tensor, b: torch.Tensor, top: int = 8) -> float:
    """Largest change between two logit rows of the same context in a top-`top` token's gap to a's best
    token: how far a near-tie can move under plain's own arithmetic noise."""
    idx = a.topk(min(top, a.numel())).indices
    best = int(a.argmax())
    return float(((a[idx] - a[best]) - (b[idx] - b[best])).abs().max())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def engine_backend(model, head, s: EngineSizes, device, backend: str, prompts) -> dict:
    """All modes on one attention backend, and the near-tie check against plain decoding.

    Standard: bf16 GPU kernels are not batch-invariant, so a speculative output may leave plain's
    at a near-tie. Plain's own variability sets the bound, measured in this run: the largest shift of
    a top-8 token's logit gap to the best token between plain decoding alone (batch 1) and (a) plain
    batched (all prompts at once), (b) a teacher-forced prefill of plain's output. A speculative
    output passes if, at its first divergence from plain alone, plain's best logit minus plain's logit
    of the speculative token is at most that bound. (On the CPU's batch-invariant float32 path the
    bound is normally 0: outputs must be identical.)"""
    from sglang_cascade.controller import CascadeConfig, SpecConfig
    from sglang_cascade.engine import Engine, EngineConfig

    def make(mode, max_batch, **kw):
        return Engine(EngineConfig(mode=mode, max_batch=max_batch, max_context=256, device=str(device),
                                   attention_backend=backend, **kw), model=model, head=head)

    warm = make("static", 2, static_config=SpecConfig.parse("3x1x4"))     # CUDA/cuBLAS init out of the timings
    run_engine(warm, prompts[:2], 8, prefix="warm")
    alone_engine = make("plain", 1)
    alone_logits = record_decode_logits(alone_engine)
    plain, plain_meta, plain_wall = run_engine(alone_engine, prompts, s.new_tokens)
    plain_logits = [alone_logits[f"r{i}"] for i in range(len(prompts))]
    batched_engine = make("plain", len(prompts))
    batched_logits = record_decode_logits(batched_engine)
    batched, batched_meta, batched_wall = run_engine(batched_engine, prompts, s.new_tokens)
    prefill = prefill_logits(alone_engine, prompts, plain)

    shift_batched, shift_prefill, max_abs, plain_divergences = 0.0, 0.0, 0.0, []
    for i in range(len(prompts)):
        div = first_divergence(plain[i], batched[i])
        agree = min(len(plain[i]), len(batched[i]), len(plain[i]) if div is None else div + 1)
        # (the divergence step itself still shares its context)
        for t in range(agree):
            a, b = plain_logits[i][t], batched_logits[f"r{i}"][t]
            shift_batched = max(shift_batched, gap_shift(a, b))
            max_abs = max(max_abs, float((a - b).abs().max()))
        for t in range(len(plain[i])):
            shift_prefill = max(shift_prefill, gap_shift(plain_logits[i][t], prefill[i][t]))
            max_abs = max(max_abs, float((plain_logits[i][t] - prefill[i][t]).abs().max()))
        if div is not None and div < agree:
            row = plain_logits[i][div]
            plain_divergences.append({"prompt": i, "index": div, "alone": plain[i][div], "batched": batched[i][div],
                                      "gap": float(row.max() - row[batched[i][div]])})
    bound = max(shift_batched, shift_prefill)

    def summary(outs, metas, wall, eng):
        labels = collections.Counter(label for it in eng.iteration_log for label in it["configs"])
        tokens = sum(map(len, outs))
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else None,
                "iterations": len(eng.iteration_log),
                "mean_accept_length": statistics.mean(m["spec_accept_length"] for m in metas),
                "accepted_drafts": sum(m["spec_accepted_drafts"] for m in metas),
                "verify_ct": sum(m["spec_verify_ct"] for m in metas), "request_iterations_per_config": dict(labels)}

    modes = {"plain": summary(plain, plain_meta, plain_wall, alone_engine),
             "plain_batched": summary(batched, batched_meta, batched_wall, batched_engine)}
    spec_modes = {"static chain 3x1x4": dict(mode="static", static_config=SpecConfig.parse("3x1x4")),
                  "static tree 4x2x8": dict(mode="static", static_config=SpecConfig.parse("4x2x8")),
                  "cascade": dict(mode="cascade", cascade=CascadeConfig())}
    failures, warnings = [], []
    for name, kw in spec_modes.items():
        eng = make(max_batch=4, **kw)
        outs, metas, wall = run_engine(eng, prompts, s.new_tokens)
        divergences = []
        for i in range(len(prompts)):
            div = first_divergence(plain[i], outs[i])
            if div is None:
                continue
            if div >= len(plain[i]) or div >= len(outs[i]):
                divergences.append({"prompt": i, "index": div, "within_bound": False, "why": "length differs"})
                continue
            row = plain_logits[i][div]
            gap = float(row.max() - row[outs[i][div]])
            divergences.append({"prompt": i, "index": div, "plain": plain[i][div], "spec": outs[i][div],
                                "gap": gap, "within_bound": gap <= bound})
        bad = [d for d in divergences if not d["within_bound"]]
        modes[name] = {**summary(outs, metas, wall, eng), "identical_to_plain": len(prompts) - len(divergences),
                       "divergences": divergences, "ok": not bad}
        if name == "cascade" and eng.controller is not None:
            modes[name]["controller"] = {k: eng.controller.summary()[k]
                                         for k in ("request_iterations_per_config", "speculative_iteration_share")}
        if bad:
            failures.append(f"{backend} {name}: {len(bad)} divergence(s) beyond the near-tie bound {bound:.4g}: {bad}")
        if kw["mode"] == "static" and modes[name]["accepted_drafts"] == 0:
            warnings.append(f"{backend} {name}: no draft accepted; the equality check is weak")
    return {"near_tie_bound": bound, "bound_parts": {"gap_shift_alone_vs_batched": shift_batched,
                                                     "gap_shift_alone_vs_prefill": shift_prefill,
                                                     "max_abs_logit_diff": max_abs},
            "plain_alone_vs_batched_divergences": plain_divergences, "modes": modes,
            "failures": failures, "warnings": warnings}


def engine_part(args, device: torch.device) -> dict:
    s = CPU_SIZES if args.quick else GPU_SIZES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_target(s, device, dtype)
    head, training = train_head(model, s, args.train_seconds, device)
    log(f"engine: head trained ({training['train_steps']} steps, held-out chain accept length "
        f"{training['heldout_chain_acceptance']['mean_accept_len']:.2f}) after {time.perf_counter() - t0:.0f} s")
    prompts = random_prompts(s.eval_prompts, s.vocab, seed=2)    # held out: the head trained on seed 1's
    backends = ["torch"]
    try:
        import flashinfer  # noqa: F401
        if device.type == "cuda":
            backends.append("flashinfer")
    except Exception:   # absent, or present without its CUDA libraries
        pass
    result = {"status": "ok", "target": {**s._asdict(), "dtype": str(dtype).removeprefix("torch."), "top_k": 2,
                                         "lm_head_scale": 8, "seed": 0},
              "training": training, "backends": {}, "failures": [], "warnings": []}
    for backend in backends:
        try:
            r = engine_backend(model, head, s, device, backend, prompts)
        except Exception:
            r = {"error": traceback.format_exc()}
            result["failures"].append(f"{backend}: raised (see backends.{backend}.error)")
        result["backends"][backend] = r
        result["failures"] += r.get("failures", [])
        result["warnings"] += r.get("warnings", [])
    if "flashinfer" not in backends:
        result["warnings"].append("flashinfer does not import here (or CPU run): torch attention only")
    if result["failures"]:
        result["status"] = "failed"
    return result


# ---------------------------------------------------------------------------------------------- part 3
class TopKOutput(NamedTuple):
    """The fields of SGLang's StandardTopKOutput (a NamedTuple) that PrunedExperts.rewrite reads."""
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


def reference_moe(x, w13, w2, ids, weights) -> tuple[torch.Tensor, list[int]]:
    """SGLang's fused-MoE semantics in plain torch: row r = sum_k weights[r,k] * expert_{ids[r,k]}(x[r])
    (gate/up, SiLU-and-mul, down); slots with expert id -1 contribute nothing and load no expert, as
    the CUDA kernels skip them. Returns (output, experts loaded)."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    loaded = sorted(ids[ids >= 0].unique().tolist())
    for e in loaded:
        rows, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[rows] @ w13[e].t()).chunk(2, dim=-1)
        out.index_add_(0, rows, ((F.silu(gate) * up) @ w2[e].t()) * weights[rows, slot, None])
    return out, loaded


def import_without_sglang() -> dict:
    """Imports pruned_experts in a fresh interpreter and lists the sglang modules that came with it."""
    import importlib.util

    code = ("import sys, json; import sglang_cascade.plugin.pruned_experts; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'sglang' or m.startswith('sglang.'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    modules = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    return {"imported": proc.returncode == 0, "sglang_modules": modules, "stderr_tail": proc.stderr[-2000:],
            "sglang_installed": importlib.util.find_spec("sglang") is not None,
            "ok": proc.returncode == 0 and modules == []}


def graph_replay(device, routed, width: int, budget_sets, fresh: bool) -> dict:
    """Captures rewrite() in a CUDA graph, then arms each budget set and replays: the graph's output
    must equal the eager rewrite's (the buffers' contents change, the program does not).
    fresh: the graph is captured before any verify armed the instance, so its buffers are created
    inside the capture; else an eager armed verify created them first."""
    from sglang_cascade.plugin.pruned_experts import PrunedExperts

    routing = PrunedExperts()
    if not fresh:
        routing.arm(budget_sets[0], width, device)
        routing.disarm()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        routing.rewrite(0, routed)                     # warm-up, as a graph runner does (unarmed: a no-op)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = routing.rewrite(0, routed)
    cases = []
    for budgets in [*budget_sets, None]:
        if budgets is not None:
            routing.arm(budgets, width, device)
        expected = routing.rewrite(0, routed)          # eager, from the armed buffers
        graph.replay()
        torch.cuda.synchronize()
        same = bool(torch.equal(captured.topk_ids, expected.topk_ids)
                    and torch.equal(captured.topk_weights, expected.topk_weights))
        cut_rows = int((expected.topk_ids < 0).all(-1).sum()) if budgets is not None else 0
        cases.append({"budgets": budgets, "graph_equals_eager": same, "cut_rows_eager": cut_rows,
                      "cut_rows_graph": int((captured.topk_ids < 0).all(-1).sum())})
        routing.disarm()
    return {"buffers_created_inside_capture": fresh, "cases": cases, "ok": all(c["graph_equals_eager"] for c in cases)}


def pruned_experts_part(args, device: torch.device) -> dict:
    from sglang_cascade.plugin.pruned_experts import PrunedExperts

    if args.quick:
        experts, top_k, hidden, width_e = 64, 2, 32, 16
    else:       # Qwen3-30B-A3B's MoE layer: 128 experts, top-8, hidden 2048, expert width 768
        experts, top_k, hidden, width_e = 128, 8, 2048, 768
    width, budgets = 6, [5, 0, 2, 5, 1, 3, 0, 4]       # draft tokens per request; 0 = plain (root only)
    rows = len(budgets) * width
    gen = torch.Generator(device=device).manual_seed(0)
    # float32: the check is of routing semantics, so kept rows can be compared tightly
    w13 = torch.randn(experts, 2 * width_e, hidden, generator=gen, device=device) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, width_e, generator=gen, device=device) / width_e ** 0.5
    x = torch.randn(rows, hidden, generator=gen, device=device)
    logits = torch.randn(rows, experts, generator=gen, device=device)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    routed = TopKOutput(weights / weights.sum(-1, keepdim=True), ids.to(torch.int32), logits)

    routing = PrunedExperts()
    routing.num_experts, routing.count_routed = experts, True
    routing.arm(budgets, width, device)
    new = routing.rewrite(3, routed)
    counts = routing.disarm()
    loaded, routed_counts = counts.resolve() if counts is not None else ([], [])
    passthrough = routing.rewrite(3, routed) is routed

    kept = [r * width + j for r, b in enumerate(budgets) for j in range(width) if j <= b]
    cut = [i for i in range(rows) if i not in kept]
    before, loaded_before = reference_moe(x, w13, w2, routed.topk_ids, routed.topk_weights)
    after, loaded_after = reference_moe(x, w13, w2, new.topk_ids, new.topk_weights)
    kept_experts = sorted(routed.topk_ids[kept].unique().tolist())
    diff = float((after[kept] - before[kept]).abs().max())
    scale = float(before[kept].abs().max())
    if device.type == "cuda":
        convention = "cuda: cut rows get expert id -1 and weight 0"
        convention_ok = bool((new.topk_ids[cut] == -1).all() and (new.topk_weights[cut] == 0).all())
    else:
        convention = ("cpu: cut rows get their request root's expert ids and weight 0 "
                      "(the CUDA -1 convention is not run)")
        roots = [i - i % width for i in cut]
        convention_ok = bool(torch.equal(new.topk_ids[cut], routed.topk_ids[roots])
                             and (new.topk_weights[cut] == 0).all())
    checks = {
        "convention": convention_ok,
        "kept_rows_routing_unchanged": bool(torch.equal(new.topk_ids[kept], routed.topk_ids[kept])
                                            and torch.equal(new.topk_weights[kept], routed.topk_weights[kept])),
        "kept_rows_output_equal": diff <= 1e-4 * max(scale, 1.0),   # reordered float32 sums; a wrong
                                                                      # expert term would be O(scale)
        "cut_rows_output_zero": bool((after[cut] == 0).all()),
        "cut_rows_load_no_experts": loaded_after == kept_experts,
        "cuts_drop_experts": len(loaded_after) < len(loaded_before),   # the routing exercises a saving
        "counts_reported": (loaded, routed_counts) == ([len(loaded_after)], [len(loaded_before)]),
        "unarmed_passthrough": passthrough,
    }
    detail = {"convention": convention, "rows": rows, "kept_rows": len(kept), "cut_rows": len(cut),
              "experts_loaded_unrewritten": len(loaded_before), "experts_loaded_rewritten": len(loaded_after),
              "experts_of_kept_rows": len(kept_experts), "kept_rows_max_abs_diff": diff,
              "counts": {"loaded": loaded, "routed": routed_counts}}
    imp = import_without_sglang()
    checks["imports_without_sglang"] = imp["ok"]
    graphs = {}
    if device.type == "cuda":
        other = [3, 3, 0, 1, 5, 2, 4, 0]
        for fresh in (False, True):
            name = "graph_replay_buffers_created_inside_capture" if fresh else "graph_replay"
            try:
                graphs[name] = graph_replay(device, routed, width, [budgets, other], fresh)
            except Exception:
                graphs[name] = {"ok": False, "error": traceback.format_exc()}
            checks[name] = graphs[name]["ok"]
    failed = [k for k, v in checks.items() if not v]
    return {"status": "failed" if failed else "ok", "shape": {"experts": experts, "top_k": top_k, "hidden": hidden,
                                                             "expert_width": width_e, "budgets": budgets,
                                                             "draft_tokens": width, "dtype": "float32"},
            "checks": checks, "failed_checks": failed, "detail": detail, "import": imp,
            "graphs": graphs or "skipped: CUDA only"}


# ---------------------------------------------------------------------------------------------- main
OPTIONAL_PACKAGES = ("transformers", "safetensors", "tqdm", "tokenizers", "huggingface_hub")


def markdown(payload: dict) -> str:
    p = payload["parts"]
    lines = [f"GPU check on {payload['device']}; torch {payload['torch']} (CUDA {payload['cuda']}); "
             f"commit {payload['commit']}; {payload['date']}. Command: `{payload['command']}`. "
             f"Result: {'PASS' if payload['ok'] else 'FAIL'}.", "",
             "| part | status | summary |", "|---|---|---|"]
    for name in PARTS:
        r = p.get(name)
        if r is None:
            continue
        lines.append(f"| {name} | {r['status']} | {_part_line(name, r)} |")
    bench = p.get("moe_bench", {})
    if bench.get("rows"):
        lines += ["", "MoE verify cost (part 1): measured vs data-movement prediction "
                      f"({bench['hbm_source']}).", "",
                  "| locality | tokens | distinct experts / layer | ms | predicted ms | measured / predicted |",
                  "|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            pred = f"{r['predicted_ms']:.3f}" if r["predicted_ms"] else "-"
            ratio = f"{r['measured_over_predicted']:.2f}" if r["measured_over_predicted"] else "-"
            lines.append(f"| {r['locality']} | {r['tokens']} | {r['distinct_experts']:.1f} | {r['ms']:.3f} | "
                         f"{pred} | {ratio} |")
    eng = p.get("engine", {})
    for backend, r in eng.get("backends", {}).items():
        if "modes" not in r:
            continue
        lines += ["", f"Engine (part 2), attention {backend}, near-tie bound {r['near_tie_bound']:.4g} nats.", "",
                  "| mode | tokens/s | mean accept length | identical to plain | divergences within bound |",
                  "|---|---|---|---|---|"]
        for mode, m in r["modes"].items():
            ident = m.get("identical_to_plain", "-")
            within = (f"{sum(d['within_bound'] for d in m['divergences'])}/{len(m['divergences'])}"
                      if "divergences" in m else "-")
            tps = f"{m['tokens_per_s']:.1f}" if m["tokens_per_s"] else "-"
            lines.append(f"| {mode} | {tps} | {m['mean_accept_length']:.2f} | {ident} | {within} |")
    return "\n".join(lines) + "\n"


def _part_line(name: str, r: dict) -> str:
    if r["status"] in ("error", "skipped"):
        return (r.get("reason") or r.get("error", "").strip().splitlines()[-1]).replace("|", "/")
    if name == "moe_bench":
        f = r.get("fit", {})
        return (f"r(ms, distinct experts) {f.get('r_ms_vs_distinct_experts', float('nan')):.3f}, "
                f"r(ms, tokens) {f.get('r_ms_vs_tokens', float('nan')):.3f}")
    if name == "engine":
        t = r["training"]
        return (f"head: {t['train_steps']} steps, held-out chain accept length "
                f"{t['heldout_chain_acceptance']['mean_accept_len']:.2f}; failures {len(r['failures'])}, "
                f"warnings {len(r['warnings'])}")
    return ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in r["checks"].items())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run of every part")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--train-seconds", type=float, default=75.0,
                    help="part 2 on a GPU: the head's training time after a timed probe (default 75)")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="override the HBM bandwidth (TB/s) of part 1")
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu --quick")
    if device.type == "cuda":   # an explicit index: tensors report cuda:N, and the rewrite's buffers compare devices
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results_dir = pathlib.Path(args.results_dir) if args.results_dir else RESULTS
    runners = {"moe_bench": lambda: moe_bench_part(args, device, device_name, results_dir),
               "engine": lambda: engine_part(args, device),
               "pruned_experts": lambda: pruned_experts_part(args, device)}
    results = {}
    for name in parts:
        log(f"part {name} ...")
        t0 = time.perf_counter()
        try:
            results[name] = runners[name]()
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in OPTIONAL_PACKAGES:
                results[name] = {"status": "skipped", "reason": f"package {e.name} is not installed here"}
            else:
                results[name] = {"status": "error", "error": traceback.format_exc()}
        except Exception:
            results[name] = {"status": "error", "error": traceback.format_exc()}
        results[name]["elapsed_s"] = time.perf_counter() - t0
        log(f"part {name}: {results[name]['status']} ({results[name]['elapsed_s']:.0f} s)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = all(r["status"] in ("ok", "skipped") for r in results.values())
    payload = {**provenance(), "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
               "command": "python evals/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "args": vars(args), "ok": ok,
               "failed_parts": [n for n, r in results.items() if r["status"] in ("failed", "error")],
               "skipped_parts": [n for n, r in results.items() if r["status"] == "skipped"], "parts": results}
    md = markdown(payload)
    write(args.out, payload, md, results_dir)
    print(md)
    return payload


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
