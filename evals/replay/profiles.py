"""Cost profiles: the wall time of one engine iteration (draft + verify) as a function of its batch, so a
replay can price any policy's batches without running the model.

A batch is what a real engine knows after the iteration: each request's configuration, tree size and
context length, and the distinct experts per MoE layer its verify routed to (from the trace, in the
trace target's terms: TRACE_EXPERTS of TRACE_TOP_K per layer). Two profiles:

* CpuProfile: least squares on the portable engine's own iterations (the evals' iteration log), so
  it predicts this machine's engine; prefill from the trace recording's timed prefills.
* H100Profile: the MoE data-movement model with published figures for a Qwen3-30B-A3B-shaped target
  on one H100 SXM; every constant and its source is in its docstring.
"""

from __future__ import annotations

import gzip
import json
import pathlib
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from sglang_cascade.controller import MoEShape, SpecConfig

ENGINE_LOG = pathlib.Path(__file__).resolve().parents[1] / "results" / "eval_report_engine.iterations.json.gz"
PLAIN_LABEL = "plain"


@dataclass
class Batch:
    """One iteration as the replay runs it: per request its configuration and context length, and the
    distinct experts per layer of the whole verify (trace target's terms)."""

    configs: list[SpecConfig]
    seq_lens: list[int]
    distinct_experts: list[int]


def _config(label: str) -> SpecConfig:
    if label == PLAIN_LABEL:
        return SpecConfig(0)
    steps, rest = label[1:].split("k")
    topk, tokens = rest.split("n")
    return SpecConfig(int(steps), int(topk), int(tokens))


def verify_features(configs, seq_lens, experts) -> list[float]:
    """CPU verify time's regressors: fixed, tokens verified, requests, distinct experts summed over
    layers (one small GEMM pair each), attention reads (context x tree rows), in thousands."""
    tokens = sum(c.draft_tokens for c in configs)
    return [1.0, tokens, len(configs), sum(experts), sum(s * c.draft_tokens for s, c in zip(seq_lens, configs)) / 1e3]


def draft_features(configs) -> list[float]:
    """CPU draft time's regressors: any drafting, the deepest chain (levels run batch-wide), head rows
    (one per drafted request per level, topk per level after the first), drafting requests."""
    spec = [c for c in configs if c.speculative]
    if not spec:
        return [0.0, 0.0, 0.0, 0.0]
    return [1.0, max(c.steps for c in spec), sum(c.steps * c.topk for c in spec), len(spec)]


def _lstsq(x: list[list[float]], y: list[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.array(x), np.array(y)
    theta = np.linalg.lstsq(a, b, rcond=None)[0]
    return theta, a @ theta


class CpuProfile:
    """Fitted to the portable engine's measured iterations (default MoE + default head, 1 torch thread,
    this 2-core CPU): verify = theta . verify_features, draft = phi . draft_features, each by ordinary
    least squares over every logged iteration of every mode. Prefill = a + b * prompt tokens from the
    trace recording's timed prefills (same engine classes, same thread count)."""

    name = "cpu"
    device = "cpu"   # what an engine there passes to machine_balance()

    def __init__(self, trace: dict, log_path: pathlib.Path = ENGINE_LOG):
        with gzip.open(log_path, "rt") as f:
            logs = json.load(f)
        its = [it for mode in logs.values() for it in mode]
        configs = [[_config(c) for c in it["configs"]] for it in its]
        vx = [verify_features(c, it["seq_lens"], it["distinct_experts"]) for c, it in zip(configs, its)]
        dx = [draft_features(c) for c in configs]
        verify = [it["wall_s"] - it["draft_s"] for it in its]
        self.theta, v_hat = _lstsq(vx, verify)
        self.phi, d_hat = _lstsq(dx, [it["draft_s"] for it in its])
        wall = np.array([it["wall_s"] for it in its])
        rel = (v_hat + d_hat - wall) / wall
        log_res = np.log((v_hat + d_hat) / wall)
        self.fit = {"iterations": len(its), "source": str(log_path.name),
                    "median_abs_rel_error": float(np.median(np.abs(rel))),
                    "p90_abs_rel_error": float(np.percentile(np.abs(rel), 90)),
                    "mean_rel_error": float(np.mean(rel)),
                    "per_mode_median_abs_rel_error": {
                        mode: float(np.median(np.abs(rel[lo:lo + len(v)])))
                        for mode, v, lo in _spans(logs)},
                    # robust sigma of the log residual: the noise a replay injects
                    "noise_sigma": float(1.4826 * np.median(np.abs(log_res - np.median(log_res)))),
                    "verify_coefficients": dict(zip(("fixed_s", "per_token_s", "per_request_s",
                                                     "per_distinct_expert_s", "per_kilo_attention_read_s"),
                                                    map(float, self.theta))),
                    "draft_coefficients": dict(zip(("fixed_s", "per_level_s", "per_head_row_s", "per_request_s"),
                                                   map(float, self.phi)))}
        self.noise_sigma = self.fit["noise_sigma"]
        pre = [(r["prompt_tokens"], r["prefill_s"]) for r in trace["requests"]]
        self.prefill_coef, _ = _lstsq([[1.0, n] for n, _ in pre], [t for _, t in pre])
        self.shape = MoEShape.from_config(SimpleNamespace(**trace["target"]["config"]),
                                          draft_params=trace["head"]["draft_params"], bytes_per_param=4,
                                          kv_bytes_per_value=8)
        self.sources = ("least squares on the portable engine's logged iterations (evals/results/"
                        f"{log_path.name}, {len(its)} iterations, {len(logs)} modes, batch 1-"
                        f"{max(map(len, configs))}); prefill from the trace recording's timed prefills")

    def experts(self, trace_counts: list[int], tokens: int) -> list[int]:
        return trace_counts

    def iteration_s(self, batch: Batch) -> tuple[float, float]:
        """(wall, draft) seconds."""
        draft = max(0.0, float(np.dot(self.phi, draft_features(batch.configs))))
        verify = float(np.dot(self.theta, verify_features(batch.configs, batch.seq_lens, batch.distinct_experts)))
        return max(verify, 1e-4) + draft, draft

    def prefill_s(self, prompt_tokens: list[int]) -> float:
        return float(sum(max(0.0, self.prefill_coef[0] + self.prefill_coef[1] * n) for n in prompt_tokens))


def _spans(logs: dict):
    lo = 0
    for mode, v in logs.items():
        yield mode, v, lo
        lo += len(v)


# Qwen3-30B-A3B's config.json (Hugging Face Qwen/Qwen3-30B-A3B): the shape the H100 profile prices.
QWEN3_30B_A3B = SimpleNamespace(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                intermediate_size=6144, vocab_size=151936)


class H100Profile:
    """A Qwen3-30B-A3B-shaped target (bf16) on one H100 SXM, priced as data movement with a roofline.

    verify = floor + max(bytes / (bandwidth * bw_eff), flops / (peak * mfu)), where
      bytes = dense weights + 48 layers x distinct experts x 3*2048*768*2 B + KV bytes read
              (48 layers x 4 KV heads x 128 x 2 (K, V) x 2 B = 96 KiB per cached token; a tree reads its
              request's cache once), flops = 2 x active params x tokens + attention 4 x 48 x 4096 x
              context x tree rows.
    draft = per drafted level: draft_floor + EAGLE-3 head bytes / bandwidth, batch-wide (deepest tree).
    Figures: HBM3 3.35 TB/s and 989 TFLOP/s dense bf16 (NVIDIA H100 SXM datasheet); bw_eff 0.8 (what
    memory-bound decode kernels reach in practice, e.g. STREAM-like copies reach ~90%); mfu 0.5 for the
    grouped expert GEMMs; floor 2.5 ms per verify step: ~500 kernel launches of a 48-layer MoE decode step
    (attention, router, top-k, grouped GEMMs, norms) at ~5 us each under CUDA graphs, which with the
    2.5 ms of weight reads at batch 1 gives ~5 ms per token (~200 tok/s, the order of published batch-1
    figures for this model on one H100); draft_floor 0.25 ms per head step; head 0.25 B parameters
    (one Llama layer of width 2048 plus fc and a 32k draft vocabulary, an assumption).
    Distinct experts: 128 * (1 - (1 - 8/128)^T) per layer for T verified tokens, independent routing.
    The trace target's own counts are not carried over: its MoE was made from a dense model and routes
    most tokens to a few experts (256 tokens reach ~12 of its 16 experts, what 5 independent tokens
    would), while Qwen3-30B-A3B is trained with a load-balancing loss. Routing is read from the
    batch's token count alone, so on this profile the cost model's expert signal is that count.
    61 GB of bf16 weights leave ~15 GB of an 80 GB H100 for KV: ~150k tokens, enough for 256 requests of the traces' lengths.
    """

    name = "h100"
    device = "cuda"
    bandwidth, bw_eff, peak, mfu = 3.35e12, 0.8, 989e12, 0.5
    floor_s, draft_floor_s, draft_params = 2.5e-3, 0.25e-3, 250_000_000

    def __init__(self, noise_sigma: float):
        self.shape = MoEShape.from_config(QWEN3_30B_A3B, draft_params=self.draft_params)
        s = self.shape
        self._expert_bytes = s.bytes_per_param * s.expert_params
        self._dense_bytes = s.bytes_per_param * s.dense_params
        self.noise_sigma = noise_sigma
        self.sources = ("H100 SXM datasheet (3.35 TB/s HBM3, 989 TFLOP/s bf16), Qwen3-30B-A3B config.json; "
                        "launch floor, efficiencies and head size assumed (see evals/replay/profiles.py)")

    def experts(self, trace_counts: list[int], tokens: int) -> list[int]:
        """Per layer of the big target, its distinct experts for `tokens` routed tokens (see the class doc)."""
        e, k = self.shape.num_experts, self.shape.top_k
        return [round(e * (1 - (1 - k / e) ** tokens))] * self.shape.num_layers

    def iteration_s(self, batch: Batch) -> tuple[float, float]:
        s = self.shape
        tokens = sum(c.draft_tokens for c in batch.configs)
        weights = self._dense_bytes + self._expert_bytes * sum(batch.distinct_experts)
        kv = s.kv_bytes_per_token * sum(batch.seq_lens)
        attn = 4 * s.num_layers * s.hidden_size * sum(n * c.draft_tokens for n, c in zip(batch.seq_lens, batch.configs))
        flops = 2 * s.active_params * tokens + attn
        verify = self.floor_s + max((weights + kv) / (self.bandwidth * self.bw_eff), flops / (self.peak * self.mfu))
        levels = max((c.steps for c in batch.configs), default=0)
        draft = levels * (self.draft_floor_s + s.bytes_per_param * s.draft_params / (self.bandwidth * self.bw_eff))
        return verify + draft, draft

    def prefill_s(self, prompt_tokens: list[int]) -> float:
        """One batched prefill: every expert read once, 2 x active params FLOPs per token."""
        tokens = sum(prompt_tokens)
        return self.floor_s + max(self.shape.total_bytes / (self.bandwidth * self.bw_eff),
                                  2 * self.shape.active_params * tokens / (self.peak * self.mfu))

