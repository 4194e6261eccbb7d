"""Batch-aware iteration cost model of an MoE target, for a request's cost at batch > 1.

Why: at batch 1 Cascade divides measured iteration times; at batch > 1 one wall time is shared by
every request, so a request's cost comes from predictions: by default the batch's predicted time had
every request run this request's configuration, over the batch all plain; or what the request adds,
the batch with its tree minus without it (see relative_costs).
Decoding an MoE is mostly data movement, so the prediction is linear in

    overhead      1 per non-empty iteration (launches, scheduling, sampling)
    weight bytes  dense weights + distinct experts touched: per layer, n routed tokens reach
                  D(n) = E * (1 - (1 - k/E) ** (1 + eta * (n - 1)))  distinct experts; eta = 1 is
                  independent routing, E*(1-(1-k/E)^n); eta < 1 says tokens share experts and is
                  fitted from the engine's observed per-layer distinct-expert counts
    KV bytes      the KV cache each request reads (a tree reads its request's cache once)
    FLOPs         2 * active params per verified token + attention over the cached tokens
    draft bytes   drafter weights read per draft step (steps run batch-wide: the deepest tree counts)

with each feature normalised by the bytes of the whole model. The coefficients (seconds per unit)
are fitted online to measured wall times by exponentially forgetting least squares, regularised
towards a prior of "every byte and FLOP at one effective bandwidth", that bandwidth calibrated from
the first iterations. The prior matters only where the batches seen so far do not tell the features
apart (e.g. every request running the same tree); the data decide the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import mul

from .types import IterationRecord

FEATURES = ("overhead", "weight_bytes", "kv_bytes", "flops", "draft_bytes")


@dataclass(frozen=True)
class MoEShape:
    """What one forward of the target (and drafter) moves and computes.

    num_layers: decoder layers (all assumed MoE; put dense layers' MLPs in dense_params).
    hidden_size: attention width (heads * head_dim), for attention FLOPs over the KV cache.
    num_experts: routed experts per layer (E); top_k: experts each token is routed to (k).
    expert_params: parameters of one routed expert in one layer (e.g. 3 * hidden * moe_intermediate).
    dense_params: parameters read by every forward whatever the routing: attention, norms, router,
        shared experts, dense MLPs, embeddings and LM head.
    kv_bytes_per_token: KV-cache bytes of one cached token, all layers together.
    bytes_per_param: 2 for bf16/fp16, 4 for fp32, ~0.5-1 for quantised weights.
    draft_params: drafter parameters read per draft step (0 for n-gram drafting).
    """

    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    expert_params: int
    dense_params: int
    kv_bytes_per_token: int
    bytes_per_param: float = 2
    draft_params: int = 0

    def __post_init__(self):
        if min(self.num_layers, self.hidden_size, self.num_experts, self.top_k, self.expert_params) < 1:
            raise ValueError(f"MoEShape: layers, hidden size, experts, top_k and expert params must be >= 1: {self}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEShape: top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if min(self.dense_params, self.kv_bytes_per_token, self.draft_params) < 0 or self.bytes_per_param <= 0:
            raise ValueError(f"MoEShape: dense params, KV bytes and draft params must be >= 0, "
                             f"bytes_per_param > 0: {self}")

    @classmethod
    def from_config(cls, config, draft_params: int = 0, bytes_per_param: float = 2,
                    kv_bytes_per_value: float | None = None) -> "MoEShape":
        """The shape of a Hugging Face model config (attributes only: no transformers import).

        Covers the spellings of Mixtral (num_local_experts, intermediate_size), Qwen2/3-MoE
        (num_experts, moe_intermediate_size, shared_expert_intermediate_size) and DeepSeek
        (n_routed_experts, n_shared_experts); a dense model counts as one expert always taken.
        kv_bytes_per_value: bytes of one cached K or V element (default bytes_per_param).
        """
        h, layers = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        experts = (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
                   or getattr(config, "n_routed_experts", None) or 1)
        top_k = (getattr(config, "num_experts_per_tok", None) or 1) if experts > 1 else 1
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        shared = (getattr(config, "shared_expert_intermediate_size", None) or 0) + \
            (getattr(config, "n_shared_experts", None) or 0) * inter
        attn = h * head_dim * (2 * heads + 2 * kv_heads)
        dense = layers * (attn + experts * h + 2 * h + 3 * h * shared) + 2 * config.vocab_size * h + h
        kv_value = bytes_per_param if kv_bytes_per_value is None else kv_bytes_per_value
        return cls(num_layers=layers, hidden_size=heads * head_dim, num_experts=experts, top_k=min(top_k, experts),
                   expert_params=3 * h * inter, dense_params=dense,
                   kv_bytes_per_token=int(2 * layers * kv_heads * head_dim * kv_value),
                   bytes_per_param=bytes_per_param, draft_params=draft_params)

    @property
    def active_params(self) -> int:
        """Parameters one token uses: dense ones plus its k experts in every layer."""
        return self.dense_params + self.num_layers * self.top_k * self.expert_params

    @property
    def total_bytes(self) -> float:
        """Bytes of all target weights: what a forward reads once every expert is touched."""
        return self.bytes_per_param * (self.dense_params + self.num_layers * self.num_experts * self.expert_params)


def machine_balance(device_type: str) -> float:
    """Prior FLOPs per byte of the machine a target runs on, which the fit then corrects: how dear one
    verified token's FLOPs are next to reading weights. A GPU's is ~25x a CPU's; with a CPU's prior, a
    large GPU batch's extra verify tokens look expensive when they are nearly free (the weight reads
    still dominate), and Cascade under-speculates there (evals/replay, H100 profile).

    cpu: 10, the value the CPU engine's cost model was tuned with. cuda: 250, between A100 (312
    TFLOP/s bf16 over 2.0 TB/s: 153), H200 (989 / 4.8: 206) and H100 SXM (989 / 3.35: 295).
    """
    return 250.0 if device_type.startswith("cuda") else 10.0


class MoECostModel:
    """Predicts iteration wall time and each request's marginal share of it.

    Use: `observe(record)` once per iteration (fits the model, remembers the batch), then
    `relative_costs(record)` for the cost of each of its requests relative to plain decoding.
    Tunables (not flags; they shape the fit, not the policy): forgetting 0.99 (a ~100-iteration
    memory, the paper's t_base refresh period), prior_weight 2 (the prior counts as two typical
    iterations), flops_per_byte (prior machine balance, FLOP/s over bytes/s: machine_balance() gives
    10 for a CPU and 250 for a GPU), routing_ema 0.1 (smoothing of eta).
    """

    CALIBRATION_ITERS = 16   # iterations whose median sets the prior's effective bandwidth
    SOLVE_EVERY = 8          # re-fit at least this often even when no one asks for a cost

    def __init__(self, shape: MoEShape, *, forgetting: float = 0.99, prior_weight: float = 2.0,
                 flops_per_byte: float = 10.0, routing_ema: float = 0.1):   # 10: machine_balance("cpu")
        if not (0 < forgetting <= 1 and prior_weight > 0 and flops_per_byte > 0 and 0 < routing_ema <= 1):
            raise ValueError("MoECostModel: need 0 < forgetting <= 1, prior_weight > 0, flops_per_byte > 0, "
                             "0 < routing_ema <= 1")
        self.shape = shape
        self.forgetting, self.prior_weight, self.routing_ema = forgetting, prior_weight, routing_ema
        total = shape.total_bytes
        bpp = shape.bytes_per_param
        self._dense = bpp * shape.dense_params / total
        self._expert = bpp * shape.num_layers * shape.expert_params / total   # per distinct expert per layer
        self._kv = shape.kv_bytes_per_token / total                            # per cached token read
        self._flop_token = 2 * shape.active_params / (flops_per_byte * total)  # per verified token
        self._flop_attn = 4 * shape.num_layers * shape.hidden_size / (flops_per_byte * total)  # x cached tokens
        self._draft = bpp * shape.draft_params / total                        # per draft step
        self._E, self._q = shape.num_experts, 1.0 - shape.top_k / shape.num_experts
        self.eta = 1.0
        self._theta = [0.0] * len(FEATURES)
        self._unsolved = 0            # samples added since the last solve
        self.samples = 0
        self.fit_error = 0.0          # EMA of |predicted - measured| / measured, before each update
        self._A = [[0.0] * len(FEATURES) for _ in FEATURES]
        self._b = [0.0] * len(FEATURES)
        self._weight = 0.0
        self._calibration: list[float] = []
        self._t_ref = 0.0             # prior seconds per normalised unit (time to read the whole model)
        # the last observed iteration, for relative_costs(): requests, tokens, the two deepest draft
        # steps, weight feature, whether verify was uniform-width, KV tokens, the deepest request's
        # KV tokens; and its histogram of tree sizes
        self._batch = (0, 0, 0, 0, 0.0, False, 0, 0)
        self._phi = [0.0] * len(FEATURES)   # its features
        self._sizes: dict[int, int] = {}

    # -- model ---------------------------------------------------------------------------------
    @property
    def theta(self) -> list[float]:
        """Fitted seconds per unit of each feature (FEATURES order); solved when first needed."""
        if self._unsolved:
            self._solve()
        return self._theta

    def distinct_experts(self, tokens: float) -> float:
        """Expected distinct experts per layer reached by `tokens` routed tokens."""
        if tokens <= 0:
            return 0.0
        return self._E * (1.0 - self._q ** (1.0 + self.eta * (tokens - 1)))

    def _weights(self, tokens: float) -> float:
        return self._dense + self._expert * self.distinct_experts(tokens) if tokens > 0 else 0.0

    def predict(self, record: IterationRecord) -> float:
        """Predicted wall time of an iteration (seconds)."""
        agg = _aggregate(record)
        return sum(t * f for t, f in zip(self.theta, self._features(agg, self._weights(agg[1]))))

    def _features(self, agg: tuple, weights: float) -> list[float]:
        """Rows cut from a uniform-width verify count as FLOPs, not as routed tokens (they load no
        experts of their own)."""
        count, _, kv_tokens, rows, rows_attn, top1 = agg[:6]
        return [1.0 if count else 0.0, weights, self._kv * kv_tokens,
                self._flop_token * rows + self._flop_attn * rows_attn, self._draft * top1]

    # -- online fit ----------------------------------------------------------------------------
    def observe(self, record: IterationRecord) -> None:
        """Fit to one measured iteration and remember its batch for relative_costs()."""
        agg = _aggregate(record)
        count, tokens, kv_tokens, rows, _, top1, top2, self._sizes, deepest_seq = agg
        self._update_routing(record.distinct_experts, tokens)
        weights = self._weights(tokens)
        self._batch = (count, tokens, top1, top2, weights, rows > tokens, kv_tokens, deepest_seq)
        self._phi = self._features(agg, weights)
        t = record.wall_time_s
        if count and t > 0:
            self._fit(self._phi, t)

    def _fit(self, phi: list[float], t: float) -> None:
        """Forgetting least-squares statistics += this sample.

        The 5x5 solve runs when coefficients are needed (relative_costs at batch > 1), else every
        SOLVE_EVERY samples, so a batch-1 request measured by the clock does not pay for it.
        fit_error uses the coefficients of the last solve.
        """
        if self.samples:
            predicted = sum(a * f for a, f in zip(self._theta, phi))
            self.fit_error += 0.05 * (abs(predicted - t) / t - self.fit_error)
        if len(self._calibration) < self.CALIBRATION_ITERS:
            self._calibration.append(t / max(sum(phi[1:]), 1e-12))
            self._t_ref = sorted(self._calibration)[len(self._calibration) // 2]
        lam = self.forgetting
        self._weight = lam * self._weight + 1.0
        for i, fi in enumerate(phi):
            row = self._A[i]
            for j, fj in enumerate(phi):
                row[j] = lam * row[j] + fi * fj
            self._b[i] = lam * self._b[i] + fi * t
        self.samples += 1
        self._unsolved += 1
        if self._unsolved >= self.SOLVE_EVERY:
            self._solve()

    def _update_routing(self, counts: list[int], tokens: int) -> None:
        """Fit eta so that D(tokens) matches the observed mean distinct experts per layer (EMA)."""
        if not counts or tokens < 2 or self._q <= 0:
            return
        seen = sum(counts) / len(counts)
        if not 0 < seen < self._E:
            return   # saturated: every expert touched, eta is not identifiable
        exponent = math.log(1.0 - seen / self._E) / math.log(self._q)
        eta = min(2.0, max(0.01, (exponent - 1.0) / (tokens - 1)))
        self.eta += self.routing_ema * (eta - self.eta)

    def _solve(self) -> None:
        """theta = argmin sum_i lam^i (t_i - theta.phi_i)^2 + sum_j R_j (theta_j - prior_j)^2, theta >= 0.

        R_j is prior_weight times the mean squared feature j, so the prior weighs like
        `prior_weight` iterations in every direction, whatever the feature's scale.
        """
        n = len(FEATURES)
        prior = [0.0] + [self._t_ref] * (n - 1)   # overhead: none assumed; all else at one bandwidth
        m = [row[:] for row in self._A]
        v = self._b[:]
        for j in range(n):
            reg = self.prior_weight * (self._A[j][j] / self._weight + 1e-12)
            m[j][j] += reg
            v[j] += reg * prior[j]
        self._theta = [max(0.0, x) for x in _solve_linear(m, v)]
        self._unsolved = 0

    # -- costs per request ---------------------------------------------------------------------
    def _delta(self, n: int) -> tuple[float, float]:
        """Weight time a tree of n tokens adds to the rest of the batch, and what 1 token would add."""
        rest = self._batch[1] - n
        rest_weights = self._weights(rest)
        th1 = self._theta[1]
        return th1 * (self._batch[4] - rest_weights), th1 * (self._weights(rest + 1) - rest_weights)

    def relative_costs(self, record: IterationRecord, batch_cost: str = "uniform") -> list[float]:
        """Per request of `record`, the iteration just observed: its cost / its cost had it run plain.

        batch_cost "uniform": the predicted time of this batch had every request run this request's
        configuration, over the same batch all plain (T_c / T0). One request's marginal in a batch
        that otherwise decodes plain carries what the whole batch would share (the draft steps run
        batch-wide, the expert reads that plain tokens already pay for), so a request that explores
        alone judges a configuration dearer than it is once others run it too, and a batch settles on
        plain where speculating together pays (evals/replay, H100 profile, 32 requests; figures in
        docs/design.md). In a batch of one configuration it equals "allocated".

        A request's marginal speculation cost is the predicted time of the batch minus the batch with
        it plain (weights its extra tokens add, their FLOPs and attention, draft steps only its tree
        needs; in a uniform-width verify (rows > tokens_verified), the rows its chain alone adds to the
        others). "allocated": the batch's whole predicted speculation time, T - T0 with T0 the same
        batch all plain, is split over the speculating requests in proportion to their marginals, and
        a request's ratio is (T0 / batch + its part) / (T0 / batch): alone, T / T0, the paper's ratio
        from the model instead of the clock; in a batch, U > 1 for every speculating request means the
        batch's tokens per second rise. The split also charges what no single request adds (draft
        steps several trees share, experts several requests pull, rows of a uniform verify below the
        second-deepest chain). "marginal": the ratio is the request's marginal time
        over one plain token's, a stricter test that pays off when freed time would be filled with
        more requests.
        """
        th = self.theta
        count, _, top1, top2, _, uniform, kv_tokens, deepest_seq = self._batch
        floor = 1e-9 + 1e-6 * self._t_ref   # times below it are no signal (predictions of nothing)
        if batch_cost == "uniform" and count > 1:
            return self._uniform_costs(record, th, floor)
        deltas = {n: self._delta(n) for n in self._sizes}   # one entry per distinct tree size
        kv, token, attn = th[2] * self._kv, th[3] * self._flop_token, th[3] * self._flop_attn
        # rows the unique deepest chain adds to every other request of a uniform-width verify
        widening = (top1 - top2) * (token * (count - 1) + attn * (kv_tokens - deepest_seq)) if uniform else 0.0
        deepest = th[4] * self._draft * (top1 - top2) + widening   # what only the deepest tree needs
        base = th[0] * (count <= 1)
        marginals = []   # (spec, plain) per request; None for plain requests
        for obs in record.requests:
            n, steps = obs.tokens_verified, obs.config.steps
            if n == 1 and not steps:
                marginals.append(None)
                continue
            seq = obs.seq_len
            d_spec, d_plain = deltas[n]
            common = base + kv * seq
            per_token = token + attn * seq
            spec = common + d_spec + per_token * n + (deepest if steps == top1 else 0.0)
            marginals.append((spec, common + d_plain + per_token))
        if batch_cost == "marginal":
            return [1.0 if m is None else max(m[0], floor) / max(m[1], floor) for m in marginals]
        extra = [0.0 if m is None else max(m[0] - m[1], 0.0) for m in marginals]
        total = sum(extra)
        t0 = self._all_plain(th)
        spent = sum(a * f for a, f in zip(th, self._phi)) - t0
        if total <= 0 or t0 <= floor or spent <= 0:
            return [1.0] * len(marginals)
        scale = count * spent / (total * t0)
        return [1.0 + scale * e for e in extra]

    def _all_plain(self, th: list[float]) -> float:
        """Predicted time of the last observed batch had every request decoded plain (one token, no draft)."""
        count, kv_tokens = self._batch[0], self._batch[6]
        phi0 = self._features((count, count, kv_tokens, count, kv_tokens, 0), self._weights(count))
        return sum(a * f for a, f in zip(th, phi0))

    def _uniform_costs(self, record: IterationRecord, th: list[float], floor: float) -> list[float]:
        """T_c / T0 per request (see relative_costs), one prediction per distinct configuration."""
        count, kv_tokens = self._batch[0], self._batch[6]
        t0 = self._all_plain(th)
        if t0 <= floor:
            return [1.0] * len(record.requests)
        ratios = {}
        out = []
        for obs in record.requests:
            n, steps = obs.tokens_verified, obs.config.steps
            if n == 1 and not steps:
                out.append(1.0)
                continue
            key = (n, steps)
            if key not in ratios:
                phi = self._features((count, count * n, kv_tokens, count * n, n * kv_tokens, steps),
                                     self._weights(count * n))
                ratios[key] = max(1.0, sum(a * f for a, f in zip(th, phi)) / t0)
            out.append(ratios[key])
        return out

    def describe(self) -> dict:
        """JSON-able state of the fit."""
        return {"coefficients": dict(zip(FEATURES, self.theta)), "routing_eta": self.eta,
                "prior_seconds_per_unit": self._t_ref, "samples": self.samples,
                "fit_error": self.fit_error}


def _aggregate(record: IterationRecord) -> tuple:
    """One pass over the batch: requests, tokens (routed), KV tokens, rows computed and rows x KV
    tokens (FLOPs and attention; rows = tokens unless verify is uniform-width), the two deepest draft
    steps (counted with multiplicity), a histogram of tree sizes and the KV tokens of the deepest
    request."""
    tokens = kv_tokens = rows = rows_attn = top1 = top2 = deepest_seq = 0
    sizes: dict[int, int] = {}
    for r in record.requests:
        n, seq, steps = r.tokens_verified, r.seq_len, r.config.steps
        sizes[n] = sizes.get(n, 0) + 1
        tokens += n
        kv_tokens += seq
        m = r.rows if r.rows > n else n
        rows += m
        rows_attn += m * seq
        if steps > top1:
            top1, top2, deepest_seq = steps, top1, seq
        elif steps > top2:
            top2 = steps
    return len(record.requests), tokens, kv_tokens, rows, rows_attn, top1, top2, sizes, deepest_seq


def _solve_linear(m: list[list[float]], v: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the systems here are 5x5; no numpy on purpose).

    It runs every iteration at batch > 1, hence plain loops rather than max(key=lambda) and
    generators (a third less time); same operations in the same order, so the same result.
    """
    n = len(v)
    for c in range(n):
        top = m[c]
        p, big = c, abs(top[c])   # the first row of largest |m[r][c]|, as max() would pick
        for r in range(c + 1, n):
            a = abs(m[r][c])
            if a > big:
                p, big = r, a
        if big < 1e-300:
            continue
        if p != c:
            m[c], m[p] = m[p], top
            v[c], v[p] = v[p], v[c]
            top = m[c]
        pivot, vc = top[c], v[c]
        for r in range(c + 1, n):
            row = m[r]
            f = row[c] / pivot
            if f:
                for k in range(c, n):
                    row[k] -= f * top[k]
                v[r] -= f * vc
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        row = m[r]
        if abs(row[r]) < 1e-300:
            continue
        x[r] = (v[r] - sum(map(mul, row[r + 1:], x[r + 1:]))) / row[r]
    return x
