"""The K=0 tax on SGLang's real server: Cascade held at plain decoding against no speculation.

    .venv/bin/python evals/k0_tax.py       # chat, concurrency 1 and 4, 2 rounds of 12 requests per cell

Cascade's floor is what its steps-0 tier costs: SGLang verifies each token through TARGET_VERIFY
(which the plugin hands to the decode kernel) and would run the draft model's extend after each step
(which the plugin skips while the batch stays plain, --cascade-plain-draft-extend skip; --extend-run
adds a third mode that runs it, as SGLang's own steps-0 tier does).

Why interleaved bursts. This machine's speed drifts by tens of percent over minutes, wider than the
3% being judged. So every mode's server runs side by side with the others, each sleeping while idle
(--sleep-on-idle: a waiting server takes no core), and the modes take turns burst by burst, the same
requests each (`concurrency` at once), in mirrored order (plain first, then the other first): a
request's two measurements are seconds apart, so drift lands on both. Each round starts fresh
servers. Per cell, the ratio mode / plain of tokens over request-seconds, with a 95% paired bootstrap
interval over requests, stratified by round (evals/precision.py); the goal (>= 0.97x plain) is met
only where the interval's lower end clears it, and unresolved where the interval is wider than +-3%.
Writes evals/results/k0_tax.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import sys
import tempfile

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from evals import precision  # noqa: E402
from evals.common import provenance, write  # noqa: E402
from evals.run_evals import read_log  # noqa: E402
from evals.serving import RequestSpec, free_port, load, running_server  # noqa: E402
from evals.targets import K0_MODE, SGLangTarget  # noqa: E402
from sglang_cascade import workloads  # noqa: E402

PLAIN = "plain"
EXTEND_RUN = f"{K0_MODE}, draft extend run"   # SGLang's steps-0 tier as it is
GOAL = 0.97
SLEEP_ON_IDLE = ["--sleep-on-idle"]


def bursts(workload: str, conc: int, requests: int, max_new: int, seed: int) -> list[list[RequestSpec]]:
    """`requests` held-out prompts of a served workload in its request format, `conc` to a burst."""
    form, texts = workloads.served_prompts(workload, "heldout", requests, seed)
    specs = [RequestSpec(f"{workload}-c{conc}-{i}", workload, t, max_new, form) for i, t in enumerate(texts)]
    return [specs[i:i + conc] for i in range(0, len(specs), conc)]


def measure(target, modes, cells, rounds: int, tmp: pathlib.Path) -> tuple[dict, dict]:
    """{(cell, mode): [round -> {rid: (tokens, seconds)}]}, and per (cell, mode) the errored requests and
    the Cascade modes' decode-iteration wall times."""
    served = {(cell, m): [{} for _ in range(rounds)] for cell in cells for m, _ in modes}
    extra = {(cell, m): {"errors": 0, "iteration_ms": []} for cell in cells for m, _ in modes}
    bar = tqdm(total=rounds * sum(len(b) for b in cells.values()) * len(modes), desc="k0 tax bursts")
    for r in range(rounds):
        with contextlib.ExitStack() as stack:
            urls, logs, seen = {}, {}, {}
            for label, flags in modes:
                port, name = free_port(), f"{label.replace(' ', '_').replace(',', '')}-{r}"
                logs[label] = tmp / f"{name}.iterations.jsonl"
                command = target.command(flags + SLEEP_ON_IDLE, port, str(logs[label]))
                urls[label] = stack.enter_context(running_server(command, port, tmp / f"{name}.log", target.env))
                load(urls[label], [RequestSpec("warmup", "chat", "Say hello.", 4, "chat")], 1)
            for cell, groups in cells.items():
                for b, group in enumerate(groups):
                    order = modes if (b + r) % 2 == 0 else modes[::-1]
                    for label, _ in order:
                        results, _ = load(urls[label], group, cell[1])
                        for res in results:
                            if res.error:
                                extra[(cell, label)]["errors"] += 1
                            else:
                                served[(cell, label)][r][res.rid] = (res.output_tokens, res.latency_s)
                        bar.update()
                for label, _ in modes:   # the server appends to its log: this cell's lines are the new ones
                    entries = read_log(logs[label])
                    extra[(cell, label)]["iteration_ms"] += iteration_ms(entries[seen.get(label, 0):], cell[1])
                    seen[label] = len(entries)
    bar.close()
    return served, extra


def iteration_ms(entries: list[dict], batch: int) -> list[float]:
    """Wall times of the plugin's decode iterations at `batch` requests (Cascade modes; plain logs none):
    the per-iteration cost without the prefills and queueing that tokens/s also carries."""
    return [1000 * e["wall_s"] for e in entries if e["batch"] == batch]


def summarise(served: dict, extra: dict, cells, modes) -> list[dict]:
    out = []
    for cell in cells:
        plain_speed = _speed(served[(cell, PLAIN)])
        for label, _ in modes[1:]:
            iv = precision.ratio(served[(cell, label)], [served[(cell, PLAIN)]])
            its = extra[(cell, label)]["iteration_ms"]
            errors = extra[(cell, label)]["errors"] + extra[(cell, PLAIN)]["errors"]
            out.append({"workload": cell[0], "concurrency": cell[1], "mode": label,
                        "plain_tokens_per_request_s": plain_speed, "tokens_per_request_s": _speed(served[(cell, label)]),
                        "vs_plain": iv.estimate, "low": iv.low, "high": iv.high, "per_round": list(iv.per_round),
                        "paired_requests_min": iv.requests, "errors": errors,
                        "iteration_ms_median": statistics.median(its) if its else None,
                        "verdict": "missed" if errors else iv.verdict(GOAL)})
    return out


def _speed(rounds: list[dict]) -> float:
    """Output tokens over request-seconds, all rounds together."""
    tokens = sum(t for r in rounds for t, _ in r.values())
    seconds = sum(s for r in rounds for _, s in r.values())
    return tokens / seconds if seconds else 0.0


def table(summary: list[dict], meta: dict) -> str:
    lines = ["# K=0 tax: Cascade held at plain vs no speculation (SGLang's server)\n",
             f"{meta['machine']}; {meta['cpu_kernels']}; commit {meta['commit']}; {meta['date']}. Command: "
             f"`{meta['command']}`. {meta['rounds']} rounds on fresh servers, {meta['requests']} requests per cell "
             f"and round, {meta['max_new_tokens']} new tokens at most; servers side by side, sleeping while "
             "idle, modes taking turns burst by burst in mirrored order.\n",
             f"Ratio = tokens over request-seconds, mode / plain, paired by request; 95% bootstrap interval; goal >= "
             f"{GOAL} met only where the lower end clears it, unresolved where the interval is wider than +-3%.\n",
             "| workload | conc | mode | plain tok/s per request | mode tok/s per request | mode / plain | 95% interval "
             "| per round | mode decode iteration ms | errors | >= 0.97 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        it = "-" if s["iteration_ms_median"] is None else f"{s['iteration_ms_median']:.1f}"
        lines.append(f"| {s['workload']} | {s['concurrency']} | {s['mode']} | {s['plain_tokens_per_request_s']:.2f} | "
                     f"{s['tokens_per_request_s']:.2f} | **{s['vs_plain']:.3f}** | {s['low']:.3f}-{s['high']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in s['per_round'])} | {it} | {s['errors']} | {s['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="chat", help=f"served workloads ({', '.join(workloads.SERVED)})")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=12, help="held-out requests per cell and round")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--extend-run", action="store_true", help="also Cascade held at plain running the draft extend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="k0_tax")
    args = ap.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",")]
    for w in args.workloads.split(","):
        if w not in workloads.SERVED:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(workloads.SERVED)}")
    if args.requests < max(concs):
        ap.error(f"--requests {args.requests} is below the largest --concurrency {max(concs)}")
    target = SGLangTarget()
    modes = [(label, flags) for label, flags in target.modes([]) if label in (PLAIN, K0_MODE)]
    if args.extend_run:
        modes.append((EXTEND_RUN, dict(modes)[K0_MODE] + ["--cascade-plain-draft-extend", "run"]))
    cells = {(w, c): bursts(w, c, args.requests, args.max_new_tokens, args.seed)
             for w in args.workloads.split(",") for c in concs}
    with tempfile.TemporaryDirectory(prefix="k0-tax-") as tmp:
        served, extra = measure(target, modes, cells, args.rounds, pathlib.Path(tmp))
    meta = {**provenance(), "command": " ".join(["python evals/k0_tax.py", *(argv if argv is not None else sys.argv[1:])]),
            "rounds": args.rounds, "requests": args.requests, "max_new_tokens": args.max_new_tokens,
            "launch": {label: " ".join(target.command(flags + SLEEP_ON_IDLE, 0, "LOG")[1:]) for label, flags in modes}}
    summary = summarise(served, extra, list(cells), modes)
    text = table(summary, meta)
    write(args.out, {**meta, "summary": summary,
                     "served": {f"{w}|{c}|{m}": rounds for ((w, c), m), rounds in served.items()}}, text)
    print(text)


if __name__ == "__main__":
    main()
