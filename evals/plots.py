"""PNG figures of an eval run: throughput per mode and workload (medians over rounds) and each mode's
ratio to no speculation with its 95% interval, Cascade's choices over a mixed run, and verify cost
against tokens verified and distinct experts."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def render(cells: list[dict], rows: list[dict], logs: dict[str, list[dict]], prefix: pathlib.Path
           ) -> list[pathlib.Path]:
    """cells: one summary per workload, concurrency and mode; rows: one per round (their time spans
    place the iteration logs)."""
    prefix = pathlib.Path(prefix)
    return [_throughput(cells, prefix.with_name(prefix.name + "_throughput.png")),
            _ratios(cells, prefix.with_name(prefix.name + "_vs_plain.png")),
            _choices(rows, logs, prefix.with_name(prefix.name + "_cascade_choices.png")),
            _verify_cost(logs, prefix.with_name(prefix.name + "_verify_cost.png"))]


def _throughput(rows, path):
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    concs = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 3.6), squeeze=False, sharey=False)
    width = 0.8 / len(concs)
    for ax, w in zip(axes[0], workloads):
        for j, c in enumerate(concs):
            vals = [next((r["tokens_per_s"] for r in rows if (r["workload"], r["mode"], r["concurrency"]) == (w, m, c)),
                         0.0) for m in modes]
            ax.bar([i + j * width for i in range(len(modes))], vals, width, label=f"concurrency {c}")
        ax.set_title(w)
        ax.set_xticks([i + width * (len(concs) - 1) / 2 for i in range(len(modes))], modes, rotation=60, ha="right",
                      fontsize=7)
        ax.set_ylabel("output tokens/s")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _ratios(cells, path):
    """Each mode's ratio to no speculation per cell, with its 95% interval; the 0.97 goal dashed."""
    keys = list(dict.fromkeys((c["workload"], c["concurrency"]) for c in cells))
    modes = [m for m in dict.fromkeys(c["mode"] for c in cells) if m != "plain"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(keys) * max(1, len(modes)) / 3, 3.6))
    width = 0.8 / max(1, len(modes))
    for j, m in enumerate(modes):
        got = [next((c["vs_plain"] for c in cells if (c["workload"], c["concurrency"], c["mode"]) == (*k, m)), None)
               for k in keys]
        xs = [i + j * width for i, g in enumerate(got) if g]
        est = [g["estimate"] for g in got if g]
        err = [[g["estimate"] - g["low"] for g in got if g], [g["high"] - g["estimate"] for g in got if g]]
        ax.errorbar(xs, est, yerr=err, fmt="o", capsize=3, label=m)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.97, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(keys))],
                  [f"{w}\nconc {c}" for w, c in keys], fontsize=7)
    ax.set_ylabel("tokens/s vs no speculation (95% CI)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _choices(rows, logs, path):
    """Each request's verified tree size per iteration of Cascade on the mixed run (1 = plain)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    phase = next((r for r in rows if r["mode"] == "cascade" and r["workload"] == "mixed"), None) or \
        next((r for r in rows if r["mode"] == "cascade"), None)
    if phase:
        its = [it for it in logs.get("cascade", []) if phase["t_start"] <= it["t"] <= phase["t_end"]]
        by_workload: dict[str, tuple[list, list]] = {}
        for it in its:
            for rid, size in zip(it["rids"], it["tree_sizes"]):
                xs, ys = by_workload.setdefault(rid.split(":")[0], ([], []))
                xs.append(it["t"] - phase["t_start"])
                ys.append(size)
        for name, (xs, ys) in sorted(by_workload.items()):
            ax.scatter(xs, ys, s=6, alpha=0.6, label=name)
        ax.set_title(f"Cascade's per-request choice over time ({phase['workload']}, concurrency "
                     f"{phase['concurrency']})", fontsize=9)
        if by_workload:
            ax.legend(fontsize=7, markerscale=2)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("tokens verified (1 = plain)")
    return _save(fig, path)


def _verify_cost(logs, path):
    its = [it for log in logs.values() for it in log if it.get("distinct_experts")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for batch_one, marker in ((True, "o"), (False, "x")):
        sel = [it for it in its if (it["batch"] == 1) == batch_one]
        if not sel:
            continue
        experts = [sum(it["distinct_experts"]) / len(it["distinct_experts"]) for it in sel]
        kw = dict(c=experts, cmap="viridis", s=8, marker=marker, label="batch 1" if batch_one else "batch > 1")
        sc = a.scatter([sum(it["tree_sizes"]) for it in sel], [1000 * it["wall_s"] for it in sel], **kw)
        b.scatter(experts, [1000 * it["wall_s"] / it["batch"] for it in sel], **kw)
    if its:
        fig.colorbar(sc, ax=b, label="distinct experts per layer")
        a.legend(fontsize=7)
    a.set_xlabel("tokens verified in the iteration (all requests)")
    a.set_ylabel("iteration wall time (ms)")
    b.set_xlabel("distinct experts per layer (mean over layers)")
    b.set_ylabel("wall time per request (ms)")
    return _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
