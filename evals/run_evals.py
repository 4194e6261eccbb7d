"""One command for the whole picture: throughput of no speculation, static EAGLE trees, SGLang's
adaptive policy and Cascade, per workload and concurrency, as users send requests, with 95% intervals,
the oracle (the best of no speculation and every static configuration, per cell, with hindsight) and
the goals judged against the intervals.

    .venv/bin/python evals/run_evals.py                    # the portable engine's server (~60 min, 2 cores)
    .venv/bin/python evals/run_evals.py --target sglang    # SGLang's real server (CPU kit) with the plugin (~60 min)
    .venv/bin/python evals/run_evals.py --smoke            # minutes-scale version (CI)

Requests as users send them (sglang_cascade.workloads.SERVED): chat, math, extraction and code-chat
through /v1/chat/completions (the server applies the model's chat template), code as a raw
HumanEval-style prefix through /generate; greedy, up to --max-new-tokens (256) new tokens, ended by
EOS as in serving. Each (workload, concurrency) cell is a steady stream: --requests requests, at most
`concurrency` in flight (a closed loop). Modes are measured in --rounds interleaved rounds on fresh
servers, the order mirrored from round to round (ABC..., then ...CBA); ratios to plain and to the
oracle come with paired bootstrap intervals over requests (evals/precision.py). A goal is met only
where the interval's lower end clears it; an interval wider than +-3% is "unresolved".

What fits in about an hour on 2 cores, and why (CELLS and STATIC below). A 256-token answer takes
~20 s at concurrency 1 on either server, every mode needs a fresh server per round (SGLang's start in
~45 s, the engine's in ~25 s), and the goals need tens of requests per mode. So each target measures
one cell per concurrency, "mixed": every served workload in one shuffled stream (what a server sees,
and Cascade's case against a fixed policy), at concurrency 1 (where speculation pays most on a CPU)
and 4, 10 requests per cell and round (two of each workload); each request keeps its workload, so the
table also breaks the mixed cells down per workload (no goals there). Estimated: the engine ~60 min
(6 modes side by side: plain, three statics, adaptive, Cascade), SGLang ~55 min (5 modes one at a
time: plain, statics 1x1x2 and 3x1x4 -- 4x2x6 is SGLang's slowest and was never its oracle --,
adaptive, Cascade; the K=0 tax is evals/k0_tax.py's report, here only with --k0). At this size
mixed cells mostly come out "unresolved" (the workloads' speed-ups differ, so 20 requests cannot pin
the ratio to +-3%); `--requests 30 --workloads mixed --concurrency 1` (~2 h) or per-workload cells
(`--workloads extraction,chat`) resolve more. --smoke is one round: it checks the plumbing, not the
figures.

Every request's own row (tokens, seconds, ids' source) is in the JSON; writes
evals/results/<out>.{json,md} and PNG plots next to them. Held-out prompts only, so no prompt the
default head was trained on is scored.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import pathlib
import random
import re
import statistics
import sys
import tempfile
import time

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from evals import plots, precision  # noqa: E402
from evals.common import RESULTS, provenance, write  # noqa: E402
from evals.serving import (ENDPOINTS, RequestResult, RequestSpec, free_port, load,  # noqa: E402
                           running_server)
from evals.targets import K0_MODE, EngineTarget, SGLangTarget  # noqa: E402
from sglang_cascade import workloads  # noqa: E402
from sglang_cascade.controller import SpecConfig  # noqa: E402
from sglang_cascade.plugin.probe import sglang_missing  # noqa: E402
from sglang_cascade.target_digest import head_target_digest, target_digest  # noqa: E402

STATIC = {"engine": "1x1x2,3x1x4,4x2x6", "sglang": "1x1x2,3x1x4"}
SINGLE = tuple(workloads.SERVED)
MIXED = "mixed"
GOALS = {"vs_plain": 0.97, "vs_oracle": 0.97, "vs_adaptive": 1.10}
# The default cells per target (see the docstring): workloads, concurrencies, requests per cell and round.
CELLS = {"engine": (MIXED, "1,4", 10), "sglang": (MIXED, "1,4", 10)}
SMOKE = (MIXED, "1", 5)  # one request of every served workload, 8 tokens, one round


def request_specs(names: list[str], concurrency: list[int], n: int, max_new: int, seed: int
                  ) -> dict[tuple[str, int], list[RequestSpec]]:
    """Per (workload, concurrency) the requests of one cell: held-out prompts, fixed seeds, no prompt in
    two cells (a server's prefix cache would serve its prefill the second time). A mixed cell takes
    n // 5 requests of every served workload, shuffled."""
    cells = [(w, c) for c in concurrency for w in names]
    share = max(1, n // len(SINGLE))
    need = dict.fromkeys(SINGLE, 0)
    for w, _ in cells:
        for x in (SINGLE if w == MIXED else (w,)):
            need[x] += share if w == MIXED else n
    pools = {x: workloads.served_prompts(x, "heldout", k, seed) for x, k in need.items() if k}
    used = dict.fromkeys(pools, 0)

    def take(x, k):
        used[x] += k
        form, texts = pools[x]
        return [(x, form, t) for t in texts[used[x] - k:used[x]]]

    out = {}
    for w, c in cells:
        picked = [p for x in SINGLE for p in take(x, share)] if w == MIXED else take(w, n)
        if w == MIXED:
            random.Random(f"{seed}-{c}").shuffle(picked)
        out[(w, c)] = [RequestSpec(f"{x}:{w}-c{c}:{i}", x, text, max_new, form)
                       for i, (x, form, text) in enumerate(picked)]
    return out


def summarise(results: list[RequestResult], wall: float, iterations: list[dict]) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    tpots = sorted(r.tpot_s for r in ok if r.tpot_s is not None)
    verifies = sum(int(r.meta.get("spec_verify_ct") or 0) for r in ok)
    req_iters = [c for it in iterations for c in it["configs"]]
    expert_counts = [it["distinct_experts"] for it in iterations if it.get("distinct_experts")]   # per verify
    # an errored request leaves the statistics but is counted: a fast mode that drops requests fails the goals
    return {"requests": len(results), "errors": len(results) - len(ok),
            "error_messages": [r.error for r in results if r.error], "tokens": tokens,
            "format": "+".join(sorted({r.format for r in results})),
            "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "tpot_ms_median": 1000 * statistics.median(tpots) if tpots else None,
            "tpot_ms_p90": 1000 * tpots[min(len(tpots) - 1, int(0.9 * len(tpots)))] if tpots else None,
            "ttft_ms_median": 1000 * statistics.median(r.ttft_s for r in ok) if ok else None,
            "output_tokens": precision.spread([r.output_tokens for r in ok]),
            "share_hit_max_tokens": sum(r.finish_reason == "length" for r in ok) / len(ok) if ok else None,
            # tokens per verify pass of a request, the prefill's first token excluded (1.0 = plain)
            "accept_length": (tokens - len(ok)) / verifies if verifies else None,
            "share_speculating": (sum(c != "plain" for c in req_iters) / len(req_iters)) if req_iters else None,
            "distinct_experts_per_verify": statistics.mean(map(statistics.mean, expert_counts)) if expert_counts
            else None,
            "iterations": len(iterations)}


def read_log(path: pathlib.Path) -> list[dict]:
    """A server's iteration log: one JSON line per decode iteration, the same format on both servers."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_all(target, modes, tmp: pathlib.Path, phases, rounds: int) -> tuple[dict, list, dict, dict]:
    """Every cell on every mode, `rounds` times on fresh servers, the modes' order mirrored each round.
    (launch commands, rows (one per mode, cell and round), results per (mode, round, workload,
    concurrency), iteration logs per mode).

    Where idle servers cost nothing (the engine's) a round's servers run side by side and each cell
    goes through the modes back to back; SGLang's CPU scheduler busy-polls when idle, so its servers
    run one at a time, each through every cell."""
    launches, rows, served, logs = {}, [], {}, {label: [] for label, _ in modes}
    bar = tqdm(total=rounds * len(modes) * len(phases), desc="evals")
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for group in ([order] if target.side_by_side else [[m] for m in order]):
            with contextlib.ExitStack() as stack:
                urls, log_at = {}, {}
                for label, flags in group:
                    name = f"{label.replace(' ', '_')}-r{r}"
                    port, log_at[label] = free_port(), tmp / f"{name}.iterations.jsonl"
                    command = target.command(flags, port, str(log_at[label]))
                    launches[label] = " ".join(command[1:])
                    urls[label] = stack.enter_context(running_server(command, port, tmp / f"{name}.server.log",
                                                                     target.env))
                    load(urls[label], [RequestSpec("warmup", "code", "Say hello.", 4),
                                       RequestSpec("warmup-chat", "chat", "Say hello.", 4, "chat")], 1)
                for (workload, conc), specs in phases.items():
                    for label, _ in group:
                        t0 = time.time()
                        results, wall = load(urls[label], specs, conc)
                        time.sleep(0.3)  # the scheduler writes a step's log line just after sending its outputs
                        t1 = time.time()
                        iterations = [it for it in read_log(log_at[label]) if t0 <= it["t"] <= t1]
                        rows.append({"mode": label, "round": r, "workload": workload, "concurrency": conc,
                                     "t_start": t0, "t_end": t1, **summarise(results, wall, iterations)})
                        served[(label, r, workload, conc)] = results
                        bar.update()
            for label, _ in group:
                logs[label] += read_log(log_at[label])
    bar.close()
    return launches, rows, served, logs


def _samples(served: dict, label: str, rounds: int, cell: tuple, workload: str | None = None) -> list[dict]:
    """Per round: request id -> (tokens, seconds) of the mode's successful requests (of one workload)."""
    return [{res.rid: (res.output_tokens, res.latency_s) for res in served[(label, r, *cell)]
             if res.error is None and workload in (None, res.workload)} for r in range(rounds)]


def _interval(served, label, baselines, rounds, cell, seed, goal, workload=None) -> dict | None:
    try:
        got = precision.ratio(_samples(served, label, rounds, cell, workload),
                              [_samples(served, b, rounds, cell, workload) for b in baselines], seed=seed)
    except ValueError:  # no request served by both in some round: nothing to compare
        return None
    return {"estimate": got.estimate, "low": got.low, "high": got.high, "per_round": list(got.per_round),
            "against": baselines[got.baseline], "verdict": got.verdict(GOALS[goal])}


def _identical(served, label, r, cell) -> bool:
    """Token ids per request equal to plain's in the same round (an errored request never is)."""
    mine = {x.rid: x.output_ids if x.error is None else None for x in served[(label, r, *cell)]}
    ref = {x.rid: x.output_ids if x.error is None else None for x in served[("plain", r, *cell)]}
    return mine.keys() == ref.keys() and all(mine[k] is not None and mine[k] == ref[k] for k in ref)


def annotate(rows: list[dict], served: dict, rounds: int, seed: int = 0) -> tuple[list[dict], dict]:
    """(one summary per cell and mode, the goals). Per cell and mode: the medians over rounds, the ratio
    to plain and to the oracle (plain and every static, the one the mode places worst against, with
    hindsight) with 95% intervals; for a mixed cell also per workload. Goals are judged on Cascade's
    intervals; any errored request fails them."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    oracle = [m for m in modes if m == "plain" or m.startswith("static")]
    for row in rows:
        row["identical_to_plain"] = _identical(served, row["mode"], row["round"], (row["workload"], row["concurrency"]))
    cells = []
    for cell in dict.fromkeys((r["workload"], r["concurrency"]) for r in rows):
        for label in modes:
            mine = [r for r in rows if (r["mode"], r["workload"], r["concurrency"]) == (label, *cell)]
            ok = [x for rnd in range(rounds) for x in served[(label, rnd, *cell)] if x.error is None]
            verifies = sum(int(x.meta.get("spec_verify_ct") or 0) for x in ok)
            summary = {"workload": cell[0], "concurrency": cell[1], "mode": label, "format": mine[0]["format"],
                       "rounds": len(mine), "requests": sum(r["requests"] for r in mine),
                       "errors": sum(r["errors"] for r in mine),
                       "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                       "tokens_per_s_per_round": [r["tokens_per_s"] for r in mine],
                       "vs_plain": _interval(served, label, ["plain"], rounds, cell, seed, "vs_plain"),
                       "vs_oracle": _interval(served, label, oracle, rounds, cell, seed, "vs_oracle"),
                       "output_tokens": precision.spread([x.output_tokens for x in ok]),
                       "tpot_ms_median": _median(r["tpot_ms_median"] for r in mine),
                       "accept_length": (sum(x.output_tokens for x in ok) - len(ok)) / verifies if verifies else None,
                       "share_speculating": _median(r["share_speculating"] for r in mine),
                       "distinct_experts_per_verify": _median(r["distinct_experts_per_verify"] for r in mine),
                       "identical_to_plain": all(r["identical_to_plain"] for r in mine)}
            if label == "cascade" and cell[0] == MIXED and "sglang-adaptive" in modes:
                summary["vs_adaptive"] = _interval(served, label, ["sglang-adaptive"], rounds, cell, seed,
                                                  "vs_adaptive")
            if cell[0] == MIXED and label != "plain":
                summary["per_workload"] = {w: {
                    "vs_plain": _interval(served, label, ["plain"], rounds, cell, seed, "vs_plain", w),
                    "vs_oracle": _interval(served, label, oracle, rounds, cell, seed, "vs_oracle", w)}
                                           for w in SINGLE}
            cells.append(summary)
    return cells, _goals(cells, rows)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _goals(cells: list[dict], rows: list[dict]) -> dict:
    """Each goal's per-cell verdicts and overall: met where every cell is met, missed where any is,
    else unresolved; an errored request anywhere makes every goal missed (figures over the requests
    that happened to succeed prove nothing). Greedy identity is its own line: SGLang's near-ties may
    flip a token without a fault."""
    cascade = [c for c in cells if c["mode"] == "cascade"]
    clean = not any(r["errors"] for r in rows)
    goals = {"no_errors": not any(r["errors"] for r in rows),
             "greedy_identical_everywhere": all(r["identical_to_plain"] for r in rows),
             "k0_tax": {f"{c['workload']}/{c['concurrency']}": c["vs_plain"] for c in cells if c["mode"] == K0_MODE}}
    for goal, threshold in GOALS.items():
        per_cell = {f"{c['workload']}/{c['concurrency']}": c[goal] for c in cascade if c.get(goal)}
        verdicts = [v["verdict"] for v in per_cell.values()]
        overall = ("missed" if not clean or not verdicts or "missed" in verdicts
                   else "unresolved" if "unresolved" in verdicts else "met")
        goals[goal] = {"goal": threshold, "cells": per_cell, "verdict": overall}
    return goals


def digests(target) -> dict:
    """The served target's and head's digests and the target the head records it was trained on: a head
    trained on another target still runs, only slower, so a report must say which pair it measured."""
    out = {"target_digest": target_digest(target.model), "head_digest": target_digest(target.draft),
           "head_trained_on": head_target_digest(target.draft)}
    known = out["target_digest"] is not None and out["head_trained_on"] is not None
    out["head_matches_target"] = out["target_digest"] == out["head_trained_on"] if known else None
    return out


def digest_text(d: dict) -> str:
    if d["head_matches_target"] is False:
        return (f"MISMATCH: the draft head (digest {d['head_digest']}) was trained on target {d['head_trained_on']}, "
                f"but the served target is {d['target_digest']}: its drafts are rejected more often than they "
                f"should be, so the speculative figures below understate speculation. ")
    state = "unchecked" if d["head_matches_target"] is None else "the head was trained on this target"
    return (f"Target digest {_f(d['target_digest'], 's')}, head digest {_f(d['head_digest'], 's')}, head trained on "
            f"{_f(d['head_trained_on'], 's')} ({state}). ")


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def _ci(iv: dict | None) -> str:
    return "-" if iv is None else f"{iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def _lengths(spread: dict) -> str:
    return "-" if spread["median"] is None else f"{spread['p10']:.0f} / {spread['median']:.0f} / {spread['p90']:.0f}"


def table(cells: list[dict]) -> str:
    lines = ["| workload | format | conc | mode | tok/s | vs plain [95% CI] | vs oracle [95% CI] | oracle "
             "| out tokens p10 / med / p90 | TPOT ms | accept len | speculating | distinct experts | = plain "
             "| errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {w: i for i, w in enumerate((*SINGLE, MIXED))}
    rank = {"plain": 0, "sglang-adaptive": 2, K0_MODE: 3, "cascade": 4}  # statics (1) between, by label
    for c in sorted(cells, key=lambda c: (order.get(c["workload"], 9), c["concurrency"], rank.get(c["mode"], 1),
                                          c["mode"])):
        lines.append(f"| {c['workload']} | {c['format']} | {c['concurrency']} | {c['mode']} | {c['tokens_per_s']:.1f} "
                     f"| {_ci(c['vs_plain'])} | {_ci(c['vs_oracle'])} | "
                     f"{c['vs_oracle']['against'] if c['vs_oracle'] else '-'} | {_lengths(c['output_tokens'])} | "
                     f"{_f(c['tpot_ms_median'], '.0f')} | {_f(c['accept_length'], '.2f')} | "
                     f"{_f(c['share_speculating'], '.0%')} | {_f(c['distinct_experts_per_verify'], '.2f')} | "
                     f"{'yes' if c['identical_to_plain'] else 'NO'} | {c['errors']} |")
    return "\n".join(lines) + "\n"


def workload_table(cells: list[dict]) -> str:
    """Cascade's ratios per workload inside the mixed cells (fewer requests each: wider intervals, no goals)."""
    mixed = [c for c in cells if c["mode"] == "cascade" and c.get("per_workload")]
    if not mixed:
        return ""
    lines = ["Cascade inside the mixed cells, per workload (no goals judged here):\n",
             "| conc | workload | vs plain [95% CI] | vs oracle [95% CI] |", "|---|---|---|---|"]
    for c in mixed:
        for w, iv in c["per_workload"].items():
            lines.append(f"| {c['concurrency']} | {w} | {_ci(iv['vs_plain'])} | {_ci(iv['vs_oracle'])} |")
    return "\n".join(lines) + "\n"


def goals_text(goals: dict) -> str:
    names = {"vs_plain": "Cascade >= {:.2f}x no speculation", "vs_oracle": "Cascade >= {:.2f}x the oracle (the best "
             "of no speculation and every static, per cell)", "vs_adaptive": "Cascade >= {:.2f}x SGLang's adaptive "
             "mode on mixed"}
    lines = ["Goals (met only where the 95% interval's lower end clears the goal; unresolved where the interval "
             f"is wider than +-{precision.RESOLUTION:.0%}):"]
    for goal, name in names.items():
        g = goals[goal]
        cells = "; ".join(f"{k}: {_ci(v)} {v['verdict']}" for k, v in g["cells"].items()) or "no cell"
        lines.append(f"- {name.format(g['goal'])}: **{g['verdict']}** ({cells})")
    lines.append(f"- greedy token ids identical to no speculation in every mode and round: "
                 f"{'yes' if goals['greedy_identical_everywhere'] else 'NO'}; errored requests: "
                 f"{'none' if goals['no_errors'] else 'SOME (so no goal counts as met)'}")
    if goals["k0_tax"]:
        lines.append("- K=0 tax (Cascade held at plain decoding on SGLang's steps-0 tier, vs no speculation): "
                     + "; ".join(f"{k}: {_ci(v)}" for k, v in goals["k0_tax"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("engine", "sglang"), default="engine",
                    help="the portable engine's server, or SGLang's real one (CPU kit)")
    ap.add_argument("--workloads", default=None, help=f"comma-separated, from {', '.join((*SINGLE, MIXED))} "
                                                      f"(default: the target's CELLS)")
    ap.add_argument("--concurrency", default=None, help="comma-separated in-flight request bounds (default: "
                                                        "the target's CELLS)")
    ap.add_argument("--requests", type=int, default=None, help="requests per cell and round (default: the "
                                                               "target's CELLS)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="mirrored rounds on fresh servers (at least 2)")
    ap.add_argument("--static", default=None, help=f"static STEPSxTOPKxTOKENS grid (default: engine "
                                                   f"{STATIC['engine']}, sglang {STATIC['sglang']}; 3x1x4 "
                                                   f"with --smoke)")
    ap.add_argument("--k0", action="store_true", help="SGLang: also Cascade held at plain decoding (the K=0 tax)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine server")
    ap.add_argument("--smoke", action="store_true", help=f"the CI size: {SMOKE[2]} requests of cell {SMOKE[0]} at "
                                                         f"concurrency {SMOKE[1]}, 8 tokens, one round (and one "
                                                         f"static unless --static is given)")
    ap.add_argument("--out", default=None, help="result name under evals/results (default eval_report_TARGET, "
                                                "eval_smoke_TARGET with --smoke)")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    workloads_, concurrency, requests = SMOKE if args.smoke else CELLS[args.target]
    if args.smoke:
        args.max_new_tokens, args.rounds = 8, 1
    args.workloads = [w.strip() for w in (args.workloads or workloads_).split(",") if w.strip()]
    args.requests = requests if args.requests is None else args.requests
    args.static = args.static or ("3x1x4" if args.smoke else STATIC[args.target])
    bad = [w for w in args.workloads if w not in (*SINGLE, MIXED)]
    if bad or not args.workloads:
        ap.error(f"unknown workloads {bad}; choose from {', '.join((*SINGLE, MIXED))}")
    try:
        args.concurrency = [int(c) for c in (args.concurrency or concurrency).split(",")]
    except ValueError:
        ap.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    for name, value, low in (("--concurrency", min(args.concurrency), 1), ("--requests", args.requests, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--rounds", args.rounds, 1 if args.smoke else 2)):
        if value < low:
            ap.error(f"{name} must be at least {low}, got {value}")
    try:
        for s in args.static.split(","):
            if not re.fullmatch(r"\d+x\d+x\d+", s):
                raise ValueError(f"{s!r} is not STEPSxTOPKxTOKENS (e.g. 3x1x4)")
            SpecConfig.parse(s)
    except ValueError as e:
        ap.error(f"--static {args.static!r}: {e}")
    try:
        phases = request_specs(args.workloads, args.concurrency, args.requests, args.max_new_tokens, args.seed)
    except (ValueError, ImportError, FileNotFoundError) as e:
        ap.error(str(e))
    out = args.out or f"eval_{'smoke' if args.smoke else 'report'}_{args.target}"
    results_dir = pathlib.Path(args.results_dir)

    if args.target == "sglang":
        reason = sglang_missing()
        if reason:
            sys.exit(f"run_evals: cannot run the SGLang target: {reason}")
        target = SGLangTarget()
    else:
        target = EngineTarget(args.threads)
    modes = [m for m in target.modes(args.static.split(",")) if args.k0 or m[0] != K0_MODE]
    pair = digests(target)
    if pair["head_matches_target"] is False:
        print(f"run_evals: {digest_text(pair)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cascade-evals-") as tmp:
        launches, rows, served, logs = run_all(target, modes, pathlib.Path(tmp), phases, args.rounds)
    cells, goals = annotate(rows, served, args.rounds, args.seed)
    prov = provenance()
    payload = {**prov, "target": f"{target.description}, embedded default MoE + default EAGLE-3 head",
               "digests": pair, "args": vars(args), "launch": launches, "endpoints": ENDPOINTS,
               "goals": goals, "cells": cells, "results": rows,
               "requests": [{"mode": m, "round": r, "workload": w, "concurrency": c, "rid": x.rid,
                             "served_workload": x.workload, "format": x.format, "output_tokens": x.output_tokens,
                             "finish_reason": x.finish_reason, "latency_s": x.latency_s, "ttft_s": x.ttft_s,
                             "error": x.error} for (m, r, w, c), results in served.items() for x in results]}
    md = (digest_text(pair) + f"{target.description}, embedded default MoE + default EAGLE-3 head, greedy, up to "
          f"{args.max_new_tokens} new tokens (EOS ends a request), held-out prompts; chat, math, extraction and "
          f"code-chat through {ENDPOINTS['chat']}, code as a raw completion through {ENDPOINTS['completion']}; "
          f"cells {', '.join(args.workloads)} at concurrency {', '.join(map(str, args.concurrency))}, each a "
          f"closed-loop stream of {args.requests} requests, {args.rounds} mirrored rounds on fresh servers; "
          f"token ids from the servers; {prov['machine']}, {prov['cpu_kernels']}; commit {prov['commit']}; "
          f"{prov['date']}. Command: `python evals/run_evals.py "
          f"{' '.join((argv if argv is not None else sys.argv[1:]))}`.\n\n"
          + table(cells) + "\n" + workload_table(cells) + "\n" + goals_text(goals))
    write(out, payload, md, results_dir)
    with gzip.open(results_dir / f"{out}.iterations.json.gz", "wt") as f:  # every engine iteration, per mode
        json.dump(logs, f)
    plots.render(cells, rows, logs, results_dir / out)
    print(md)
    return payload


if __name__ == "__main__":
    main()
