"""One command for the whole picture: throughput of no speculation, static EAGLE trees, SGLang's
adaptive policy and Cascade, per workload and concurrency, with the oracle (the best of no speculation
and every static configuration, per cell, with hindsight) and the goals checked.

    .venv/bin/python evals/run_evals.py                    # the portable engine's server
    .venv/bin/python evals/run_evals.py --target sglang    # SGLang's real server (CPU kit) with the plugin
    .venv/bin/python evals/run_evals.py --smoke            # minutes-scale version (CI)

Every mode gets its own server (started and stopped here; the engine's side by side); each workload
and concurrency is loaded through SGLang's /generate with streamed responses, on every mode in turn.
Writes evals/results/<out>.{json,md} and PNG plots next to them. Held-out prompts only
(sglang_cascade.workloads), so no prompt the default head was trained on is scored.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from evals import plots  # noqa: E402
from evals.common import RESULTS, provenance, write  # noqa: E402
from evals.serving import RequestSpec, free_port, load, poisson_arrivals, running_server  # noqa: E402
from evals.targets import K0_MODE, EngineTarget, SGLangTarget  # noqa: E402
from sglang_cascade import workloads  # noqa: E402
from sglang_cascade.plugin.probe import sglang_missing  # noqa: E402
from sglang_cascade.target_digest import head_target_digest, target_digest  # noqa: E402

STATIC = ("1x1x2", "3x1x4", "4x2x6")
SINGLE = workloads.WORKLOADS
MIXED = "mixed"


def request_specs(args) -> dict[tuple[str, int], list[RequestSpec]]:
    """Per (workload, concurrency) the requests of one measured phase; held-out prompts, fixed seeds."""
    phases = {}
    for conc in args.concurrency:
        n = max(args.prompts, conc)
        per = {w: workloads.prompts(w, "heldout", n, args.seed) for w in SINGLE}
        for w in args.workloads:
            if w == MIXED:
                pool = [(x, p) for x in SINGLE for p in per[x][: max(1, n // len(SINGLE))]]
                random.Random(args.seed).shuffle(pool)
                times = poisson_arrivals(len(pool), args.rate, args.seed)
                specs = [RequestSpec(f"{x}-{MIXED}-c{conc}-{i}", x, p, args.max_new_tokens, t)
                         for i, ((x, p), t) in enumerate(zip(pool, times))]
            else:
                specs = [RequestSpec(f"{w}-c{conc}-{i}", w, p, args.max_new_tokens) for i, p in enumerate(per[w])]
            phases[(w, conc)] = specs
    return phases


def summarise(results, wall: float, iterations: list[dict]) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    tpots = sorted(r.tpot_s for r in ok if r.tpot_s is not None)
    verifies = sum(int(r.meta.get("spec_verify_ct") or 0) for r in ok)
    req_iters = [c for it in iterations for c in it["configs"]]
    expert_counts = [it["distinct_experts"] for it in iterations if it.get("distinct_experts")]   # per verify
    # an errored request leaves the statistics but is counted: a fast mode that drops requests fails the goals
    row = {"requests": len(results), "errors": len(results) - len(ok),
           "error_messages": [r.error for r in results if r.error], "tokens": tokens,
           "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
           "tpot_ms_median": 1000 * statistics.median(tpots) if tpots else None,
           "tpot_ms_p90": 1000 * tpots[min(len(tpots) - 1, int(0.9 * len(tpots)))] if tpots else None,
           "ttft_ms_median": 1000 * statistics.median(r.ttft_s for r in ok) if ok else None,
           # tokens per verify pass of a request, the prefill's first token excluded (1.0 = plain)
           "accept_length": (tokens - len(ok)) / verifies if verifies else None,
           "share_speculating": (sum(c != "plain" for c in req_iters) / len(req_iters)) if req_iters else None,
           "distinct_experts_per_verify": statistics.mean(map(statistics.mean, expert_counts)) if expert_counts
           else None,
           "iterations": len(iterations)}
    return row


def read_log(path: pathlib.Path, target) -> list[dict]:
    if not path.is_file():
        return []
    return [target.iteration(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def run_all(target, modes, tmp: pathlib.Path, phases) -> tuple[dict, list, dict, dict]:
    """Run every phase on every mode; (launch commands, rows, output ids per mode, phase and request (None
    where the request errored), iteration logs).

    Where idle servers cost nothing (the engine's), every mode's server runs at once and each phase
    goes through the modes back to back, the order rotating from phase to phase: a drift in the
    machine's speed then lands on all modes of a phase alike. SGLang's CPU scheduler busy-polls when
    idle, so its servers run one at a time."""
    groups = [modes] if target.side_by_side else [[m] for m in modes]
    launches, logs_at, rows, ids = {}, {}, [], {label: {} for label, _ in modes}
    bar = tqdm(total=len(modes) * len(phases), desc="evals")
    for group in groups:
        with contextlib.ExitStack() as stack:
            urls = {}
            for label, flags in group:
                name = label.replace(" ", "_")
                port, logs_at[label] = free_port(), tmp / f"{name}.iterations.jsonl"
                command = target.command(flags, port, str(logs_at[label]))
                launches[label] = " ".join(command[1:])
                urls[label] = stack.enter_context(running_server(command, port, tmp / f"{name}.server.log",
                                                                 target.env))
                load(urls[label], [RequestSpec("warmup", "code", "Say hello.", 4)], 1)
            for k, ((workload, conc), specs) in enumerate(phases.items()):
                for label, _ in group[k % len(group):] + group[:k % len(group)]:
                    t0 = time.time()
                    results, wall = load(urls[label], specs, conc)
                    time.sleep(0.3)  # the scheduler writes a step's log line just after sending its outputs
                    t1 = time.time()
                    iterations = [it for it in read_log(logs_at[label], target) if t0 <= it["t"] <= t1]
                    rows.append({"mode": label, "workload": workload, "concurrency": conc, "t_start": t0,
                                 "t_end": t1, **summarise(results, wall, iterations)})
                    ids[label][(workload, conc)] = {r.rid: r.output_ids if r.error is None else None
                                                    for r in results}
                    bar.update()
    bar.close()
    return launches, rows, ids, {label: read_log(path, target) for label, path in logs_at.items()}


def annotate(rows: list[dict], ids: dict) -> dict:
    """vs plain, vs the oracle (the best of plain and every static per workload and concurrency, with
    hindsight: where no static beats plain, speculating at all was the mistake), identical greedy output
    (token ids per request: equal text can hide differing ids; an errored request is never identical),
    and the goals (any errored request fails them)."""
    goals = {"cascade_vs_plain_min": None, "cascade_vs_oracle_min": None, "cascade_vs_adaptive_mixed": {},
             "k0_tax": {}}
    for (workload, conc) in {(r["workload"], r["concurrency"]) for r in rows}:
        same = [r for r in rows if r["workload"] == workload and r["concurrency"] == conc]
        plain = next(r for r in same if r["mode"] == "plain")
        statics = [r for r in same if r["mode"].startswith("static")]
        oracle = max([plain, *statics], key=lambda r: r["tokens_per_s"])
        reference = ids["plain"][(workload, conc)]
        for r in same:
            r["vs_plain"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain["tokens_per_s"] else None
            r["vs_oracle"] = r["tokens_per_s"] / oracle["tokens_per_s"] if oracle["tokens_per_s"] else None
            r["oracle"] = oracle["mode"]
            mine = ids[r["mode"]][(workload, conc)]
            r["identical_to_plain"] = mine.keys() == reference.keys() and all(
                mine[rid] is not None and mine[rid] == reference[rid] for rid in reference)
        k0 = next((r for r in same if r["mode"] == K0_MODE), None)
        if k0 and k0["vs_plain"] is not None:
            goals["k0_tax"][f"{workload}/{conc}"] = k0["vs_plain"]
        cascade = next((r for r in same if r["mode"] == "cascade"), None)
        adaptive = next((r for r in same if r["mode"] == "sglang-adaptive"), None)
        if cascade:
            for key, value in (("cascade_vs_plain_min", cascade["vs_plain"]),
                               ("cascade_vs_oracle_min", cascade["vs_oracle"])):
                if value is not None and (goals[key] is None or value < goals[key]):
                    goals[key] = value
            if workload == MIXED and adaptive and adaptive["tokens_per_s"]:
                goals["cascade_vs_adaptive_mixed"][str(conc)] = cascade["tokens_per_s"] / adaptive["tokens_per_s"]
    goals["met"] = {
        "no_more_than_3pct_below_plain": goals["cascade_vs_plain_min"] is not None
        and goals["cascade_vs_plain_min"] >= 0.97,
        "within_3pct_of_oracle": goals["cascade_vs_oracle_min"] is not None and goals["cascade_vs_oracle_min"] >= 0.97,
        "10pct_ahead_of_adaptive_on_mixed": bool(goals["cascade_vs_adaptive_mixed"])
        and min(goals["cascade_vs_adaptive_mixed"].values()) >= 1.10,
        "greedy_identical_everywhere": all(r["identical_to_plain"] for r in rows),
        "no_errors": not any(r["errors"] for r in rows),
    }
    if not goals["met"]["no_errors"]:  # figures over the requests that happened to succeed prove nothing
        goals["met"] = dict.fromkeys(goals["met"], False)
    return goals


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| workload | conc | mode | tok/s | vs plain | vs oracle | TPOT ms med | TPOT ms p90 | accept len "
             "| speculating | distinct experts | = plain | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {w: i for i, w in enumerate((*SINGLE, MIXED))}
    rank = {"plain": 0, "sglang-adaptive": 2, K0_MODE: 3, "cascade": 4}  # statics (1) between, by label
    for r in sorted(rows, key=lambda r: (order.get(r["workload"], 9), r["concurrency"], rank.get(r["mode"], 1),
                                         r["mode"])):
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['mode']} | {r['tokens_per_s']:.1f} | "
                     f"{_f(r['vs_plain'], '.3f')} | {_f(r['vs_oracle'], '.3f')} | {_f(r['tpot_ms_median'], '.0f')} | "
                     f"{_f(r['tpot_ms_p90'], '.0f')} | {_f(r['accept_length'], '.2f')} | "
                     f"{_f(r['share_speculating'], '.0%')} | {_f(r['distinct_experts_per_verify'], '.2f')} | "
                     f"{'yes' if r['identical_to_plain'] else 'NO'} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def goals_text(goals: dict) -> str:
    adaptive = ", ".join(f"conc {c}: {v:.3f}" for c, v in goals["cascade_vs_adaptive_mixed"].items()) or "-"
    met = goals["met"]
    return (f"Goals: Cascade's worst ratio to no speculation {_f(goals['cascade_vs_plain_min'], '.3f')} "
            f"(goal >= 0.97: {'met' if met['no_more_than_3pct_below_plain'] else 'NOT met'}); worst ratio to the "
            f"oracle (the best of no speculation and every static, per cell) "
            f"{_f(goals['cascade_vs_oracle_min'], '.3f')} (goal >= 0.97: "
            f"{'met' if met['within_3pct_of_oracle'] else 'NOT met'}); Cascade / SGLang-adaptive on mixed "
            f"{adaptive} (goal >= 1.10: {'met' if met['10pct_ahead_of_adaptive_on_mixed'] else 'NOT met'}); "
            f"greedy token ids identical to no speculation in every mode: "
            f"{'yes' if met['greedy_identical_everywhere'] else 'NO'}; errored requests: "
            f"{'none' if met['no_errors'] else 'SOME (so no goal counts as met)'}.\n"
            + _k0_text(goals["k0_tax"]))


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


def _k0_text(tax: dict) -> str:
    if not tax:
        return ""
    return (f"K=0 tax (Cascade held at plain decoding on SGLang's steps-0 tier, tokens/s vs no speculation): "
            f"{min(tax.values()):.3f}-{max(tax.values()):.3f} across workloads and concurrencies.\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("engine", "sglang"), default="engine",
                    help="the portable engine's server, or SGLang's real one (CPU kit)")
    ap.add_argument("--workloads", default=",".join((*SINGLE, MIXED)))
    ap.add_argument("--concurrency", default="1,8", help="comma-separated in-flight request bounds")
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts per workload (at least conc)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--static", default=None, help=f"static STEPSxTOPKxTOKENS grid (default {','.join(STATIC)}; "
                                                   f"3x1x4 with --smoke)")
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate (requests/s) of the mixed run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine server")
    ap.add_argument("--smoke", action="store_true", help="1 prompt per workload, 8 tokens, concurrency 1 (and one "
                                                         "static unless --static is given)")
    ap.add_argument("--out", default=None, help="result name under evals/results (default eval_report_TARGET, "
                                                "eval_smoke_TARGET with --smoke)")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompts, args.max_new_tokens, args.concurrency = 1, 8, "1"
    if args.static is None:
        args.static = "3x1x4" if args.smoke else ",".join(STATIC)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in (*SINGLE, MIXED)]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {', '.join((*SINGLE, MIXED))}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    out = args.out or f"eval_{'smoke' if args.smoke else 'report'}_{args.target}"
    results_dir = pathlib.Path(args.results_dir)

    phases = request_specs(args)
    if args.target == "sglang":
        reason = sglang_missing()
        if reason:
            sys.exit(f"run_evals: cannot run the SGLang target: {reason}")
        target = SGLangTarget()
    else:
        target = EngineTarget(args.threads)
    modes = target.modes(args.static.split(","))
    pair = digests(target)
    if pair["head_matches_target"] is False:
        print(f"run_evals: {digest_text(pair)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cascade-evals-") as tmp:
        launches, rows, ids, logs = run_all(target, modes, pathlib.Path(tmp), phases)
    goals = annotate(rows, ids)
    prov = provenance()
    payload = {**prov, "target": f"{target.description}, embedded default MoE + default EAGLE-3 head",
               "digests": pair, "args": {k: v for k, v in vars(args).items()},
               "launch": launches, "goals": goals, "results": rows}
    md = (digest_text(pair) + f"{target.description}, embedded default MoE + default EAGLE-3 head, greedy, "
          f"{args.max_new_tokens} new tokens, held-out prompts ({args.prompts} per workload and concurrency; "
          f"mixed: Poisson arrivals at {args.rate}/s); {prov['machine']}, {prov['cpu_kernels']}; "
          f"commit {prov['commit']}; {prov['date']}. "
          f"Command: `python evals/run_evals.py {' '.join((argv if argv is not None else sys.argv[1:]))}`.\n\n"
          + table(rows) + "\n" + goals_text(goals))
    write(out, payload, md, results_dir)
    with gzip.open(results_dir / f"{out}.iterations.json.gz", "wt") as f:  # every engine iteration, per mode
        json.dump(logs, f)
    plots.render(rows, logs, results_dir / out)
    print(md)
    return payload


if __name__ == "__main__":
    main()
