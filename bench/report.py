#!/usr/bin/env python
"""Cross-run report of a trade-off sweep: plots, tables and claim numbers.

    python bench/report.py runs/tradeoff --out docs/tradeoff          # a sweep root
    python bench/report.py runs/tradeoff runs/extra/plain_w1_s0 --out out
    python bench/report.py runs/tradeoff --out out --difficulty-run bas_lam10_s0 --max-macs 0.5

Each positional argument is a run directory written by train.py or a folder
of them (with an optional sweep.json from the sweep driver). Writes
tradeoff.png, gate_categories.png, difficulty.png, summary.json and
results.md into --out, and prints results.md. Unfinished runs (no
report.json) are listed as missing.

Runs of several models (a depth sweep, `bench/tradeoff.py --budget depth`)
get the depth report instead (bench/depth_report.py): tradeoff.png of
accuracy vs absolute mean MACs, summary.json and results.md, each gated
network against the plain one of the same MACs; --difficulty-run and
--max-macs do not apply to it.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _positive_number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_ROOT",
                   help="a run directory, or a folder whose subfolders are run directories")
    p.add_argument("--out", required=True, help="output directory (created if needed)")
    p.add_argument("--difficulty-run", metavar="NAME",
                   help="gated run shown in difficulty.png (default: the most accurate batch-shaping run "
                   "with MAC ratio <= --max-macs)")
    p.add_argument("--max-macs", type=_positive_number, default=0.6,
                   help="MAC-ratio budget for the demo choice and the default difficulty run (default 0.6)")
    return p, p.parse_args(argv)


def main(argv=None):
    _, args = parse_args(argv)
    import depth_report
    import sweep_report

    try:
        loaded = sweep_report.load_runs(args.paths)
        if depth_report.is_depth_sweep(loaded["runs"]):
            depth_report.write_depth_report(args.paths, args.out, loaded=loaded)
        else:
            sweep_report.write_sweep_report(
                args.paths, args.out, difficulty_run=args.difficulty_run, max_macs=args.max_macs, loaded=loaded,
            )
        return 0
    except (sweep_report.SweepError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
