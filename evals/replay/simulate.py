"""Serving simulation: Poisson arrivals, continuous batching up to a maximum running size, and one policy
deciding every iteration, priced by a cost profile and answered by an acceptance trace.

What a policy sees is what a real engine gives it: decide(rids) before the iteration, (for the
confidence-budget policy) the drafted chain's probabilities after drafting, and an IterationRecord after
it, whose wall time is the profile's prediction times lognormal noise and whose distinct experts are the
union of the trace's routing over the batch's verified tokens. Prefills run as their own iteration
(admitted requests together, as the portable engine's step() does) and emit each request's first token.

Trace use: request i replays prompt i mod N of its workload's N traces (shuffled per seed), starting
at a random position and walking forward, wrapping to the trace's start after its last position. Its
output length is drawn uniformly between a quarter of its trace's length and all of it (the traces
stop at a fixed length, real outputs do not: equal lengths would finish requests in synchronised waves
and batch their prefills unlike any real load). The random start keeps copies of one prompt from
marching in lockstep (identical routing would understate a batch's distinct experts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from sglang_cascade.controller import PLAIN, IterationRecord, RequestObservation, SpecConfig
from sglang_cascade.controller.confidence_budget import ConfidenceBudgetPolicy

from .profiles import Batch


class StaticPolicy:
    """Every request runs one configuration: the engine's --mode static / --mode plain, as a SpecPolicy."""

    name = "static"

    def __init__(self, config: SpecConfig):
        self.config = config

    def add_request(self, rid):
        pass

    def finish_request(self, rid):
        pass

    def decide(self, rids):
        return {rid: self.config for rid in rids}

    def plain_ahead(self, rids, pending):
        return not self.config.speculative

    def observe(self, record):
        pass

    def request_stats(self, rid):
        return {"config": self.config.label()}

    def summary(self):
        return {"policy": self.name, "config": self.config.label()}


class Prompt:
    """One recorded prompt, indexed for the replay: acceptance of any configuration at any position,
    and the per-layer expert bitmask of that configuration's verified tokens."""

    def __init__(self, entry: dict, trees: list[str]):
        self.workload = entry["workload"]
        self.prompt_tokens = entry["prompt_tokens"]
        self.length = len(entry["tokens"])            # output tokens: the prefill's + one per position
        self.positions = len(entry["chain_accept"])
        self.chain_accept = entry["chain_accept"]
        self.tree_accept = entry["tree_accept"]
        self.confidence = entry["confidence"]
        self.trees = {label: j for j, label in enumerate(trees)}
        self.tree_masks = entry["experts_tree"]
        # chain_masks[p][k]: per layer, OR over the root and the first k chain drafts
        self.chain_masks = []
        for root, chain in zip(entry["experts_root"], entry["experts_chain"]):
            acc, rows = list(root), [list(root)]
            for node in chain:
                acc = [a | b for a, b in zip(acc, node)]
                rows.append(acc)
            self.chain_masks.append(rows)

    def accepted(self, p: int, config: SpecConfig) -> int:
        if not config.speculative:
            return 0
        if config.topk == 1:
            return min(config.steps, self.chain_accept[p])
        return self.tree_accept[p][self.trees[config.label()]]

    def masks(self, p: int, config: SpecConfig) -> list[int]:
        if config.topk == 1:
            return self.chain_masks[p][config.steps]
        return self.tree_masks[p][self.trees[config.label()]]


@dataclass
class ReplayRequest:
    rid: str
    prompt: Prompt
    arrival: float
    start: int
    length: int              # output tokens it asks for
    emitted: int = 0
    finished_at: float = 0.0

    @property
    def position(self) -> int:
        return (self.start + self.emitted - 1) % self.prompt.positions


@dataclass
class RunResult:
    tokens: int
    makespan_s: float
    iterations: int
    request_iterations: dict = field(default_factory=dict)   # config label -> request-iterations
    accepted_per_verify: float = 0.0
    choices: list = field(default_factory=list)              # (t, workload, tokens verified) per request-iteration
    saturated_tokens: int = 0                                # over iterations that began with every slot taken
    saturated_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Over the whole run, first arrival to last completion (what a load generator measures)."""
        return self.tokens / self.makespan_s if self.makespan_s else 0.0

    @property
    def saturated_tokens_per_s(self) -> float:
        """Throughput at the concurrency asked for: iterations (prefills included) that began with all
        max_running slots taken, so the arrival ramp and the final drain, alike for no policy, are left out."""
        return self.saturated_tokens / self.saturated_s if self.saturated_s else self.tokens_per_s


def requests_for(prompts: list[Prompt], n: int, rate: float | None, seed: int,
                 length: int | None = None) -> list[ReplayRequest]:
    """n requests cycling through `prompts` (shuffled), Poisson arrivals at `rate` per second (None: all at
    0), each asking for `length` output tokens (None: drawn, see the module doc)."""
    rng = random.Random(seed)
    order = prompts[:]
    rng.shuffle(order)
    t, out = 0.0, []
    for i in range(n):
        prompt = order[i % len(order)]
        if rate:
            t += rng.expovariate(rate)
        out.append(ReplayRequest(f"{prompt.workload}-{i}", prompt, t if rate else 0.0, rng.randrange(prompt.positions),
                                 length or rng.randint(max(1, prompt.length // 4), prompt.length)))
    return out


def simulate(policy, profile, requests: list[ReplayRequest], max_running: int, noise_sigma: float = 0.0,
             seed: int = 0, keep_choices: bool = False) -> RunResult:
    """Serve `requests` (fresh ReplayRequest objects) with `policy` until all finish."""
    rng = random.Random(seed + 1)
    noise = (lambda: rng.lognormvariate(-noise_sigma ** 2 / 2, noise_sigma)) if noise_sigma else (lambda: 1.0)
    waiting = sorted(requests, key=lambda r: r.arrival)
    running: list[ReplayRequest] = []
    t = waiting[0].arrival if waiting else 0.0
    t0, i, iterations, tokens, verifies, accepted_sum = t, 0, 0, 0, 0, 0
    per_config: dict[str, int] = {}
    choices = []
    sat_tokens, sat_s = 0, 0.0
    budget = isinstance(policy, ConfidenceBudgetPolicy)
    while i < len(waiting) or running:
        t_start, tokens_start = t, tokens
        if not running and waiting[i].arrival > t:
            t = waiting[i].arrival
        new = []
        while i < len(waiting) and waiting[i].arrival <= t and len(running) + len(new) < max_running:
            new.append(waiting[i])
            i += 1
        full = len(running) + len(new) == max_running
        if new:   # one prefill iteration for the newly admitted, each emits its first token
            t += profile.prefill_s([r.prompt.prompt_tokens for r in new]) * noise()
            for r in new:
                r.emitted = 1
                tokens += 1
                policy.add_request(r.rid)
                if r.emitted >= r.length:
                    r.finished_at = t
                    policy.finish_request(r.rid)
                else:
                    running.append(r)
            if not running:
                sat_tokens, sat_s = sat_tokens + full * (tokens - tokens_start), sat_s + full * (t - t_start)
                continue
        rids = [r.rid for r in running]
        decided = policy.decide(rids)
        if budget:
            lengths = policy.draft_lengths({r.rid: r.prompt.confidence[r.position] for r in running})
            configs = [SpecConfig(lengths[r.rid]) if lengths[r.rid] else PLAIN for r in running]
            drafted = [decided[rid] for rid in rids]
        else:
            configs = drafted = [decided[rid] for rid in rids]
        union = None
        total_tokens = 0
        for r, c in zip(running, configs):
            m = r.prompt.masks(r.position, c)
            union = list(m) if union is None else [a | b for a, b in zip(union, m)]
            total_tokens += c.draft_tokens
        experts = profile.experts([x.bit_count() for x in union], total_tokens)
        seq_lens = [r.prompt.prompt_tokens + r.position for r in running]
        wall, draft = profile.iteration_s(Batch(configs, seq_lens, experts))
        if drafted is not configs:   # drafting ran the full chains before the cut
            drafting = profile.iteration_s(Batch(drafted, seq_lens, experts))[1]
            wall, draft = wall - draft + drafting, drafting
        scale = noise()
        wall, draft = wall * scale, draft * scale
        t += wall
        iterations += 1
        observations, done = [], []
        for r, c, s in zip(running, configs, seq_lens):
            a = r.prompt.accepted(r.position, c)
            observations.append(RequestObservation(r.rid, c, a, c.draft_tokens, s))
            emit = min(a + 1, r.length - r.emitted)
            r.emitted += emit
            tokens += emit
            verifies += 1
            accepted_sum += a
            per_config[c.label()] = per_config.get(c.label(), 0) + 1
            if keep_choices:
                choices.append((t - t0, r.prompt.workload, c.draft_tokens))
            if r.emitted >= r.length:
                r.finished_at = t
                done.append(r)
        policy.observe(IterationRecord(wall, observations, experts, draft))
        for r in done:
            running.remove(r)
            policy.finish_request(r.rid)
        if full:
            sat_tokens, sat_s = sat_tokens + tokens - tokens_start, sat_s + t - t_start
    return RunResult(tokens, t - t0, iterations, per_config, accepted_sum / verifies if verifies else 0.0, choices,
                     sat_tokens, sat_s)


def step_cost_table(profile, prompts: list[Prompt], trace_experts: int, trace_top_k: int):
    """The confidence-budget policy's startup profile: a step's expected wall time for `requests`
    requests verifying `tokens` tokens at the traces' mean context, experts routed independently (what
    dummy profiling steps measure). Memoised: the policy asks it every iteration."""
    ctx = int(sum(p.prompt_tokens + p.positions // 2 for p in prompts) / len(prompts))
    memo = {}

    def cost(requests: int, tokens: int) -> float:
        key = (requests, tokens)
        if key not in memo:
            d = trace_experts * (1 - (1 - trace_top_k / trace_experts) ** tokens)
            configs = _spread(requests, tokens)
            n_layers = len(prompts[0].chain_masks[0][0])
            experts = profile.experts([min(trace_experts, round(d))] * n_layers, tokens)
            wall, draft = profile.iteration_s(Batch(configs, [ctx] * requests, experts))
            memo[key] = wall - draft
        return memo[key]

    return cost


def _spread(requests: int, tokens: int) -> list[SpecConfig]:
    """`tokens` verify tokens over `requests` chains as evenly as possible."""
    base, extra = divmod(tokens, requests)
    return [SpecConfig(base - 1 + (j < extra)) if base - 1 + (j < extra) else PLAIN for j in range(requests)]



def plain_capacity(cost, prompts: list[Prompt], concurrency: int) -> float:
    """Requests per second plain decoding serves at `concurrency` (cost: a step_cost_table), for sizing
    arrival rates."""
    length = sum(p.length for p in prompts) / len(prompts)
    return concurrency / (length * cost(concurrency, concurrency))
