#!/usr/bin/env python
"""Build the embedded default MoE (SmolLM2-135M-Instruct MoEfied into a Mixtral) and optionally
write its quality report.

    python scripts/build_default_moe.py                 # build into $SGLANG_CASCADE_HOME/default-moe-v2
    python scripts/build_default_moe.py --out /tmp/moe --force
    python scripts/build_default_moe.py --report        # + evals/results/default_moe_quality.{json,md}
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from sglang_cascade.models.default_model import default_moe_dir, ensure_default_moe  # noqa: E402

DEFAULT_REPORT = pathlib.Path(__file__).resolve().parents[1] / "evals/results/default_moe_quality.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=None, help=f"output folder (default {default_moe_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    ap.add_argument("--report", type=pathlib.Path, nargs="?", const=DEFAULT_REPORT, default=None,
                    help=f"write the quality report JSON here (+ .md next to it; default {DEFAULT_REPORT})")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    path = ensure_default_moe(progress=not args.quiet, out_dir=args.out, force=args.force)
    print(f"default MoE ready at {path} ({time.perf_counter() - start:.0f} s)")
    if args.report:
        from sglang_cascade.models.quality import evaluate, to_markdown, write_report

        result = evaluate(path, progress=not args.quiet)
        write_report(result, args.report)
        print(to_markdown(result))
        print(f"report written to {args.report} and {args.report.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
