"""The ``dropsplit`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    from dropsplit.demo import print_report, run_demo

    numbers = run_demo(train_steps=args.steps, q=args.q, seed=args.seed)
    print_report(numbers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
        print(f"Numbers written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="dropsplit",
        description="The explicit and implicit regularization effects of dropout.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny model and measure both effects (< 1 min)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--q", type=float, default=0.3, help="drop probability (default 0.3)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also write the numbers to this JSON file")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dropsplit`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
