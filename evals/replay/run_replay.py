"""One command for the replay report: every policy users can pick (plain, each static rung of Cascade's
ladder, SGLang's adaptive steps, a vLLM-style confidence budget) and Cascade, served in simulation from
recorded acceptance traces, priced by the CPU profile and by the H100 profile, at concurrency 1 to 256.

    .venv/bin/python -m evals.replay.run_replay            # full trace -> evals/results/replay_report.*
    .venv/bin/python -m evals.replay.run_replay --smoke    # CI trace, concurrency 1, 8, 32 (< 30 s)

The policies are the project's own classes (CascadeController, SGLangAdaptivePolicy,
ConfidenceBudgetPolicy), driven through SpecPolicy exactly as the engine drives them. The oracle is,
per profile, workload and concurrency, the best of plain and every static with hindsight. The CPU
profile is also checked against the measured engine evals (every measured cell, mode and round; validate()).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from evals.common import RESULTS, provenance, write  # noqa: E402
from evals.replay import traces  # noqa: E402
from evals.replay.profiles import CpuProfile, H100Profile  # noqa: E402
from evals.replay.simulate import (Prompt, ReplayRequest, StaticPolicy, plain_capacity, requests_for,  # noqa: E402
                                   simulate, step_cost_table)
from sglang_cascade import workloads  # noqa: E402
from sglang_cascade.controller import (CascadeConfig, CascadeController, MoECostModel,  # noqa: E402
                                       SGLangAdaptivePolicy, SpecConfig)
from sglang_cascade.controller.confidence_budget import ConfidenceBudgetPolicy  # noqa: E402
from sglang_cascade.controller.cost_model import machine_balance  # noqa: E402

WORKLOADS = (*workloads.SERVED, "mixed")
CONCURRENCY = (1, 8, 32, 128, 256)
CASCADE, BUDGET, ADAPTIVE, PLAIN = "cascade", "confidence-budget", "sglang-adaptive", "plain"
ENGINE_REPORT = RESULTS / "eval_report_engine.json"


def policies(profile, cost) -> dict:
    """name -> factory of a fresh policy (the project's classes)."""
    ladder = CascadeConfig().ladder
    out = {PLAIN: lambda: StaticPolicy(ladder[0])}
    for c in ladder[1:]:
        out[f"static {c.label()}"] = lambda c=c: StaticPolicy(c)
    out[ADAPTIVE] = SGLangAdaptivePolicy
    out[BUDGET] = lambda: ConfidenceBudgetPolicy(cost, max_steps=traces.CHAIN_STEPS)
    balance = machine_balance(profile.device)   # as the engine and the plugin build Cascade's cost model
    out[CASCADE] = lambda: CascadeController(CascadeConfig(), MoECostModel(profile.shape, flops_per_byte=balance))
    return out


def cell(profile, cost, prompts, conc, args, seed: int, keep_choices=False) -> tuple[dict, dict]:
    """Every policy on one (profile, workload set, concurrency, seed); the same requests and arrivals for all."""
    n = max(args.requests_per_slot * conc, args.min_requests)
    rate = args.load * plain_capacity(cost, prompts, conc)
    rows, choices = {}, {}
    for name, make in policies(profile, cost).items():
        reqs = requests_for(prompts, n, rate, seed)
        res = simulate(make(), profile, reqs, conc, 0.0 if args.no_noise else profile.noise_sigma, seed,
                       keep_choices and name == CASCADE)
        rows[name] = {"tokens_per_s": res.saturated_tokens_per_s, "run_tokens_per_s": res.tokens_per_s,
                      "saturated_share": res.saturated_s / res.makespan_s, "tokens": res.tokens, "makespan_s": res.makespan_s,
                      "iterations": res.iterations, "accepted_per_verify": res.accepted_per_verify,
                      "request_iterations": res.request_iterations}
        if res.choices:
            choices = res.choices
    return rows, choices


def cell_over_seeds(profile, cost, prompts, conc, args, keep_choices=False) -> tuple[dict, dict]:
    """cell() for seeds args.seed .. args.seed + args.seeds - 1 (requests, arrivals and noise differ): per
    policy the median tokens/s over seeds, each seed's own figures beside it; Cascade's choices of the first."""
    runs, choices = [], {}
    for k in range(args.seeds):
        rows, ch = cell(profile, cost, prompts, conc, args, args.seed + k, keep_choices and k == 0)
        runs.append(rows)
        choices = choices or ch
    return {name: {"tokens_per_s": statistics.median(r[name]["tokens_per_s"] for r in runs),
                   "per_seed": [r[name] for r in runs]} for name in runs[0]}, choices


def annotate(row: dict) -> dict:
    """Oracle and Cascade's ratios from the median tokens/s, with each ratio's range over seeds."""
    pol = row["policies"]
    statics = {k: v["tokens_per_s"] for k, v in pol.items() if k == PLAIN or k.startswith("static")}
    best = max(statics, key=statics.get)
    c = pol[CASCADE]["tokens_per_s"]
    row.update(oracle=best, oracle_tokens_per_s=statics[best], cascade_vs_oracle=c / statics[best],
               cascade_vs_budget=c / pol[BUDGET]["tokens_per_s"], cascade_vs_adaptive=c / pol[ADAPTIVE]["tokens_per_s"])
    seeds = range(len(pol[CASCADE]["per_seed"]))
    tps = {k: [v["per_seed"][i]["tokens_per_s"] for i in seeds] for k, v in pol.items()}
    per_seed_oracle = [max(tps[k][i] for k in statics) for i in seeds]
    for key, against in (("cascade_vs_oracle", per_seed_oracle), ("cascade_vs_budget", tps[BUDGET])):
        ratios = [tps[CASCADE][i] / against[i] for i in seeds]
        row[key + "_range"] = [min(ratios), max(ratios)]
    return row


def goals(rows: list[dict]) -> dict:
    out = {}
    for prof in dict.fromkeys(r["profile"] for r in rows):
        for conc in sorted({r["concurrency"] for r in rows if r["profile"] == prof}):
            sel = [r for r in rows if (r["profile"], r["concurrency"]) == (prof, conc)]
            wo = min(sel, key=lambda r: r["cascade_vs_oracle"])
            wb = min(sel, key=lambda r: r["cascade_vs_budget"])
            vo, vb = wo["cascade_vs_oracle"], wb["cascade_vs_budget"]
            out[f"{prof}/{conc}"] = {"cascade_vs_oracle_min": vo, "cascade_vs_oracle_min_range": wo["cascade_vs_oracle_range"],
                                     "cascade_vs_oracle_worst_workload": wo["workload"],
                                     "cascade_vs_budget_min": vb, "cascade_vs_budget_min_range": wb["cascade_vs_budget_range"],
                                     "cascade_vs_budget_worst_workload": wb["workload"],
                                     "oracle_goal_met": vo >= 0.98, "budget_goal_met": vb >= 1.0}
    return out


def validate(cpu, prompts_by_workload, args, report_path: pathlib.Path = ENGINE_REPORT) -> dict:
    """The CPU profile's replay of the measured engine eval cells: every (cell, mode, round) replayed as
    it was served (a closed loop at the cell's concurrency, the round's requests with their served
    workloads and measured output lengths, each starting at its answer's first position), predicted
    against measured tokens/s averaged over rounds as the report does. A trace holds fewer positions
    than a 256-token answer: a longer request walks its trace again from the start."""
    if not report_path.is_file():
        return {}
    report = json.loads(report_path.read_text())
    cost = step_cost_table(cpu, [p for ps in prompts_by_workload.values() for p in ps], *args.trace_experts)
    names = {"plain": PLAIN, "sglang-adaptive": ADAPTIVE, "cascade": CASCADE}
    served: dict = {}
    for q in report["requests"]:
        if not q.get("error"):
            served.setdefault((q["workload"], q["concurrency"], q["mode"], q["round"]), []).append(q)
    out = []
    for c in report["cells"]:
        mode, w, conc = c["mode"], c["workload"], c["concurrency"]
        make = policies(cpu, cost).get(names.get(mode)) or (lambda m=mode: StaticPolicy(SpecConfig.parse(m.split()[1])))
        per_round = []
        for rnd in range(c["rounds"]):
            reqs = []
            for j, q in enumerate(served.get((w, conc, mode, rnd), [])):
                pool = prompts_by_workload[q["served_workload"]]
                reqs.append(ReplayRequest(q["rid"], pool[j % len(pool)], 0.0, 0, q["output_tokens"]))
            if reqs:
                per_round.append(simulate(make(), cpu, reqs, conc, cpu.noise_sigma, args.seed + rnd).tokens_per_s)
        if per_round:
            replayed = statistics.fmean(per_round)
            rounds = c.get("tokens_per_s_per_round") or [c["tokens_per_s"]]
            out.append({"workload": w, "concurrency": conc, "mode": mode, "measured": c["tokens_per_s"],
                        "measured_rounds": rounds, "replayed": replayed, "error": replayed / c["tokens_per_s"] - 1,
                        "rounds_apart": max(rounds) / min(rounds) - 1})
    if not out:
        return {}
    errs = [abs(x["error"]) for x in out]
    return {"cells": out, "median_abs_error": statistics.median(errs), "max_abs_error": max(errs),
            "within_10pct": sum(e <= 0.10 for e in errs), "cells_total": len(errs),
            "median_rounds_apart": statistics.median(x["rounds_apart"] for x in out),
            "commit_measured": report.get("commit")}


def traces_workloads():
    return WORKLOADS[:-1]


def table(rows: list[dict]) -> str:
    names = list(rows[0]["policies"])
    short = [n.replace("static ", "") for n in names]
    head = ("| profile | workload | conc | " + " | ".join(short) + " | oracle | Cascade/oracle [seeds] | "
            "Cascade/budget [seeds] |\n|" + "---|" * (len(names) + 6) + "\n")
    lines = [f"| {r['profile']} | {r['workload']} | {r['concurrency']} | "
             + " | ".join(f"{r['policies'][n]['tokens_per_s']:.1f}" for n in names)
             + f" | {r['oracle'].replace('static ', '')} | {_ratio(r, 'cascade_vs_oracle')} | {_ratio(r, 'cascade_vs_budget')} |"
             for r in rows]
    return head + "\n".join(lines) + "\n"


def _ratio(row: dict, key: str) -> str:
    lo, hi = row[key + "_range"]
    return f"{row[key]:.3f} [{lo:.2f}-{hi:.2f}]"


def goals_text(g: dict) -> str:
    lines = ["| profile/conc | Cascade/oracle (worst workload) [seeds] | >= 0.98 | Cascade/budget (worst workload) [seeds] "
             "| >= 1.0 |", "|---|---|---|---|---|"]
    for key, v in g.items():
        (olo, ohi), (blo, bhi) = v["cascade_vs_oracle_min_range"], v["cascade_vs_budget_min_range"]
        lines.append(f"| {key} | {v['cascade_vs_oracle_min']:.3f} {v['cascade_vs_oracle_worst_workload']} "
                     f"[{olo:.2f}-{ohi:.2f}] | {'met' if v['oracle_goal_met'] else 'NOT met'} | "
                     f"{v['cascade_vs_budget_min']:.3f} {v['cascade_vs_budget_worst_workload']} [{blo:.2f}-{bhi:.2f}] | "
                     f"{'met' if v['budget_goal_met'] else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def validation_text(v: dict) -> str:
    if not v:
        return ""
    lines = [f"CPU profile against the measured engine evals (evals/results/eval_report_engine.json, commit "
             f"{v['commit_measured']}): replayed / measured tokens/s - 1, median |error| {v['median_abs_error']:.1%}, "
             f"max {v['max_abs_error']:.1%}, {v['within_10pct']} of {v['cells_total']} cells within 10%; the measured "
             f"rounds of one cell lie {v['median_rounds_apart']:.1%} apart (median), the scale below which an error "
             "is not resolved.\n",
             "| workload | conc | mode | measured | measured per round | replayed | error |",
             "|---|---|---|---|---|---|---|"]
    for c in v["cells"]:
        lines.append(f"| {c['workload']} | {c['concurrency']} | {c['mode']} | {c['measured']:.1f} | "
                     f"{' / '.join(f'{x:.1f}' for x in c['measured_rounds'])} | {c['replayed']:.1f} | {c['error']:+.1%} |")
    return "\n".join(lines) + "\n"


def render(rows: list[dict], choices: dict, prefix: pathlib.Path) -> list[pathlib.Path]:
    """PNGs: mixed-load tokens/s against concurrency per profile; Cascade's per-request choices over a
    mixed run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profs = list(dict.fromkeys(r["profile"] for r in rows))
    fig, axes = plt.subplots(1, len(profs), figsize=(5.2 * len(profs), 4), squeeze=False)
    for ax, prof in zip(axes[0], profs):
        sel = sorted((r for r in rows if r["profile"] == prof and r["workload"] == "mixed"), key=lambda r: r["concurrency"])
        for name in sel[0]["policies"]:
            ax.plot([r["concurrency"] for r in sel], [r["policies"][name]["tokens_per_s"] for r in sel],
                    marker="o", lw=2.5 if name == CASCADE else 1, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"replay, {prof} profile, mixed workload", fontsize=9)
        ax.set_xlabel("concurrency (max running requests)")
        ax.set_ylabel("output tokens/s")
    axes[0][0].legend(fontsize=7)
    paths = [prefix.with_name(prefix.name + "_throughput.png")]
    _save(fig, paths[0])
    fig, axes = plt.subplots(1, len(choices) or 1, figsize=(5.2 * max(1, len(choices)), 3.6), squeeze=False)
    for ax, (prof, ch) in zip(axes[0], choices.items()):
        for w in traces_workloads():
            pts = [(t, n) for t, x, n in ch["points"] if x == w]
            ax.scatter([t for t, _ in pts], [n for _, n in pts], s=4, alpha=0.4, label=w)
        ax.set_title(f"replay, {prof} profile: Cascade's choices, mixed, concurrency {ch['concurrency']}", fontsize=9)
        ax.set_xlabel("simulated seconds")
        ax.set_ylabel("tokens verified (1 = plain)")
        ax.legend(fontsize=7, markerscale=3)
    paths.append(prefix.with_name(prefix.name + "_cascade_choices.png"))
    _save(fig, paths[1])
    return paths


def _save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=None, help="trace file (default: the full trace, or the CI trace with --smoke)")
    ap.add_argument("--concurrency", default=None, help=f"comma-separated max running requests (default "
                                                         f"{','.join(map(str, CONCURRENCY))}; 1,8,32 with --smoke)")
    ap.add_argument("--requests-per-slot", type=int, default=3, help="requests per unit of concurrency")
    ap.add_argument("--min-requests", type=int, default=24)
    ap.add_argument("--load", type=float, default=4.0, help="Poisson arrival rate as a multiple of plain's capacity")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per cell (requests, arrivals, noise): the tables "
                                                         "give median tokens/s and each ratio's range over seeds")
    ap.add_argument("--no-noise", action="store_true", help="profile times without the measured noise")
    ap.add_argument("--smoke", action="store_true", help="CI trace, 2 requests per slot, 8 at least")
    ap.add_argument("--out", default=None, help="result name under --results-dir (default replay_report, "
                                                "replay_smoke with --smoke)")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests_per_slot, args.min_requests, args.seeds = 2, 8, 2
    args.concurrency = args.concurrency or ("1,8,32" if args.smoke else ",".join(map(str, CONCURRENCY)))
    trace_path = pathlib.Path(args.trace or (traces.CI_TRACE if args.smoke or not traces.FULL_TRACE.is_file()
                                             else traces.FULL_TRACE))
    out = args.out or ("replay_smoke" if args.smoke else "replay_report")
    concs = [int(c) for c in args.concurrency.split(",")]
    trace = traces.load(trace_path)
    args.trace_experts = (trace["target"]["num_experts"], trace["target"]["top_k"])
    by_w = {w: [Prompt(e, trace["trees"]) for e in trace["requests"] if e["workload"] == w] for w in traces_workloads()}
    by_w["mixed"] = [p for w in traces_workloads() for p in by_w[w]]
    cpu = CpuProfile(trace)
    profs = [cpu, H100Profile(cpu.noise_sigma)]
    rows, choices = [], {}
    bar = tqdm(total=len(profs) * len(concs) * len(WORKLOADS), desc="replay cells")
    for prof in profs:
        cost = step_cost_table(prof, by_w["mixed"], *args.trace_experts)
        for conc in concs:
            for w in WORKLOADS:
                keep = w == "mixed" and conc == min(32, max(concs))
                res, ch = cell_over_seeds(prof, cost, by_w[w], conc, args, keep)
                rows.append(annotate({"profile": prof.name, "workload": w, "concurrency": conc, "policies": res}))
                if keep:
                    choices[prof.name] = {"concurrency": conc, "points": ch}
                bar.update()
    bar.close()
    g = goals(rows)
    validation = {} if args.smoke else validate(cpu, by_w, args)
    prov = provenance()
    payload = {**prov, "args": {k: v for k, v in vars(args).items()}, "trace": str(trace_path.name),
               "trace_summary": {"prompts": len(trace["requests"]), "positions": trace["positions"],
                                 "target_digest": trace["target"]["digest"], "head_trained_on": trace["head"]["trained_on"]},
               "profiles": {"cpu": {"sources": cpu.sources, "fit": cpu.fit,
                                    "prefill_s": {"fixed": float(cpu.prefill_coef[0]),
                                                  "per_token": float(cpu.prefill_coef[1])}},
                            "h100": {"sources": profs[1].sources, "noise_sigma": profs[1].noise_sigma}},
               "goals": g, "validation": validation, "results": rows}
    fit = cpu.fit
    md = (f"Replay (no live model): trace {trace_path.name} ({len(trace['requests'])} held-out prompts, up to "
          f"{trace['positions']} positions each), policies are the project's classes; noise lognormal sigma "
          f"{0.0 if args.no_noise else cpu.noise_sigma:.3f}; {prov['machine']}; commit {prov['commit']}; {prov['date']}. "
          f"Command: `python -m evals.replay.run_replay {' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
          f"Profiles: cpu = {cpu.sources}; fit median |error| {fit['median_abs_rel_error']:.1%}, p90 "
          f"{fit['p90_abs_rel_error']:.1%} over {fit['iterations']} iterations. h100 = {profs[1].sources}.\n\n"
          f"Output tokens/s (replay) per policy, the median over {args.seeds} seeds (requests, arrivals and noise "
          "differ); oracle = best of plain and every static, per row, with hindsight; budget = confidence-budget; "
          "Cascade's ratios are those of the medians, [the range of the per-seed ratios].\n\n" + table(rows)
          + "\nGoals (replay):\n\n" + goals_text(g) + "\n" + validation_text(validation))
    results_dir = pathlib.Path(args.results_dir)
    write(out, payload, md, results_dir)
    render(rows, choices, results_dir / out)
    print(md)
    return payload


if __name__ == "__main__":
    main()
