"""The K=0 tax on SGLang's real server: Cascade held at plain decoding against no speculation.

    .venv/bin/python evals/k0_tax.py                      # code and chat, concurrency 1 and 8, 3 rounds

Cascade's floor is what its steps-0 tier costs: SGLang verifies through TARGET_VERIFY and runs the
draft model's extend after each step, which the plugin skips while the batch stays plain
(--cascade-plain-draft-extend skip, the default); the third mode runs it every step, as SGLang's
steps-0 tier does. One server per mode, one at a time (SGLang's CPU scheduler busy-polls when idle);
each round starts every mode afresh, in alternating order, so that a drift in the machine's speed
lands on all. Reports per round and as the median over rounds: output tokens/s and the median time
per output token, and their ratio mode / plain measured within the round; for the Cascade modes also
the median wall time of a decode iteration at the phase's concurrency (the plugin's iteration log).
Writes evals/results/k0_tax.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from evals.common import provenance, write  # noqa: E402
from evals.run_evals import summarise as serving_figures  # noqa: E402
from evals.serving import RequestSpec, free_port, load, running_server  # noqa: E402
from evals.targets import K0_MODE, SGLangTarget  # noqa: E402
from sglang_cascade import workloads  # noqa: E402


EXTEND_RUN = f"{K0_MODE}, draft extend run"   # SGLang's steps-0 tier as it is


def measure(target, modes, phases, rounds: int, tmp: pathlib.Path) -> list[dict]:
    rows = []
    bar = tqdm(total=rounds * len(modes) * len(phases), desc="k0 tax")
    for r in range(rounds):
        for label, flags in (modes if r % 2 == 0 else modes[::-1]):
            port = free_port()
            name = f"{label.replace(' ', '_')}-{r}"
            log = tmp / f"{name}.iterations.jsonl"
            command = target.command(flags, port, str(log))
            with running_server(command, port, tmp / f"{name}.server.log", target.env) as url:
                load(url, [RequestSpec("warmup", "code", "Say hello.", 4)], 1)
                for (workload, conc), specs in phases.items():
                    start = time.time()
                    figures = serving_figures(*load(url, specs, conc), [])
                    rows.append({"round": r, "mode": label, "workload": workload, "concurrency": conc,
                                 "tokens_per_s": figures["tokens_per_s"],
                                 "tpot_median_ms": figures["tpot_ms_median"], "t": time.time(),
                                 "iteration_ms_median": iteration_ms(log, start, conc)})
                    bar.update()
    bar.close()
    return rows


def iteration_ms(log: pathlib.Path, since: float, batch: int) -> float | None:
    """Median wall time of the plugin's decode iterations at `batch` requests logged after `since`
    (Cascade modes; None for plain, which has no iteration log): the per-iteration cost, without the
    prefills and queueing that tokens/s also carries."""
    if not log.exists():
        return None
    walls = [e["wall_s"] for e in map(json.loads, log.read_text().splitlines())
             if e["t"] >= since and e["batch"] == batch]
    return 1000 * statistics.median(walls) if walls else None


def summarise(rows: list[dict]) -> list[dict]:
    """Per workload, concurrency and mode held at plain: each round's ratio mode / plain, and the medians
    over rounds."""
    out = []
    for key in sorted({(r["workload"], r["concurrency"], r["mode"]) for r in rows if r["mode"] != "plain"}):
        workload, conc, mode = key
        by = {(r["round"], r["mode"]): r for r in rows if (r["workload"], r["concurrency"]) == (workload, conc)}
        rounds = sorted(n for n, m in by if m == mode)
        ratios = [by[(n, mode)]["tokens_per_s"] / by[(n, "plain")]["tokens_per_s"] for n in rounds]
        med = {m: statistics.median(by[(n, m)]["tokens_per_s"] for n in rounds) for m in ("plain", mode)}
        tpot = {m: statistics.median(by[(n, m)]["tpot_median_ms"] for n in rounds) for m in ("plain", mode)}
        its = [by[(n, mode)].get("iteration_ms_median") for n in rounds]
        out.append({"workload": workload, "concurrency": conc, "mode": mode, "plain_tokens_per_s": med["plain"],
                    "tokens_per_s": med[mode], "plain_tpot_ms": tpot["plain"], "tpot_ms": tpot[mode],
                    "iteration_ms": statistics.median(its) if None not in its else None,
                    "vs_plain_per_round": ratios, "vs_plain_median": statistics.median(ratios)})
    return out


def table(summary: list[dict], meta: dict) -> str:
    lines = [f"# K=0 tax: Cascade held at plain vs no speculation (SGLang's server)\n",
             f"{meta['machine']}; commit {meta['commit']}; {meta['date']}; {meta['rounds']} rounds, "
             f"{meta['prompts']} prompts x {meta['max_new_tokens']} tokens per workload.\n",
             "| workload | conc | mode | plain tok/s | mode tok/s | plain TPOT ms | mode TPOT ms | "
             "mode iteration ms | mode/plain per round | mode/plain median |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        it = "-" if s.get("iteration_ms") is None else f"{s['iteration_ms']:.1f}"
        lines.append(f"| {s['workload']} | {s['concurrency']} | {s['mode']} | {s['plain_tokens_per_s']:.2f} | "
                     f"{s['tokens_per_s']:.2f} | {s['plain_tpot_ms']:.1f} | {s['tpot_ms']:.1f} | {it} | "
                     f"{', '.join(f'{x:.2f}' for x in s['vs_plain_per_round'])} | "
                     f"**{s['vs_plain_median']:.3f}** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="code,chat")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts per workload (at least conc)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="k0_tax")
    args = ap.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",")]
    if args.prompts < max(concs):
        ap.error(f"--prompts {args.prompts} is below the largest --concurrency {max(concs)}")
    target = SGLangTarget()
    modes = [(label, flags) for label, flags in target.modes([]) if label in ("plain", K0_MODE)]
    modes.append((EXTEND_RUN, dict(modes)[K0_MODE] + ["--cascade-plain-draft-extend", "run"]))
    phases = {(w, c): [RequestSpec(f"{w}-c{c}-{i}", w, p, args.max_new_tokens)
                       for i, p in enumerate(workloads.prompts(w, "heldout", args.prompts, args.seed))]
              for w in args.workloads.split(",") for c in concs}
    with tempfile.TemporaryDirectory(prefix="k0-tax-") as tmp:
        rows = measure(target, modes, phases, args.rounds, pathlib.Path(tmp))
    meta = {**provenance(), "rounds": args.rounds, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
            "launch": {label: " ".join(target.command(flags, 0, "LOG")[1:]) for label, flags in modes}}
    summary = summarise(rows)
    text = table(summary, meta)
    write(args.out, {**meta, "rows": rows, "summary": summary}, text)
    print(text)


if __name__ == "__main__":
    main()
