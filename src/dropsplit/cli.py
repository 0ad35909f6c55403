"""The ``dropsplit`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from dropsplit.demo import print_report, run_demo

    numbers = run_demo(train_steps=args.steps, q=args.q, seed=args.seed)
    print_report(numbers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
        print(f"Numbers written to {args.json}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dropsplit.config import load_config
    from dropsplit.train import train

    overrides = list(args.set or [])
    if args.data:
        overrides.append(f'data.path="{args.data}"')
    config = load_config(args.config, overrides)
    out = args.out or f"runs/{Path(args.config).stem}"
    summary = train(config, out, resume=args.resume, dry_run=args.dry_run)
    print(
        f"{out}: best valid ppl {summary['best_val_ppl']:.2f}, test ppl {summary['test_ppl']:.2f}, "
        f"{summary['steps']} steps, {summary['tokens_per_second']:.0f} tokens/s"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import math

    from dropsplit.data import batchify
    from dropsplit.train import evaluate

    run = Path(args.run)
    config, corpus, model = _load_run(run, args.data)
    d = config.data
    split = getattr(corpus, args.split)
    size = d.eval_batch_size if args.split == "valid" else d.test_batch_size
    loss = evaluate(model, batchify(split, size), d.bptt)
    print(f"{run} {args.split}: loss {loss:.4f}, ppl {math.exp(loss):.2f}")
    return 0


def _load_run(run: Path, data: str | None):
    import torch

    from dropsplit.config import load_config
    from dropsplit.data import load_corpus
    from dropsplit.train import build_model

    config = load_config(run / "config.toml", [f'data.path="{data}"'] if data else [])
    d = config.data
    corpus = load_corpus(d.corpus, d.path or None, d.train_fraction)
    model = build_model(config, len(corpus.vocab))
    weights = run / "best.pt"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist: has the run evaluated yet?")
    model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    return config, corpus, model


def _measure(args: argparse.Namespace) -> int:
    import torch

    from dropsplit.data import batchify, bptt_batches
    from dropsplit.inspect_model import format_effects, measure_effects, plot_effects
    from dropsplit.models.awd import lm_forward

    run = Path(args.run)
    config, corpus, model = _load_run(run, args.data)
    data = batchify(corpus.valid, config.data.eval_batch_size)
    batches, state = [], model.init_state(data.shape[1])
    model.eval()
    with torch.no_grad():
        for _, x, y in bptt_batches(data, config.data.bptt):
            if len(batches) == args.batches:
                break
            batches.append((x, y, state))
            state = model(x, state)[1]
    model.train()
    result = measure_effects(
        model,
        lm_forward,
        batches,
        gap_samples=args.gap_samples,
        noise_samples=args.noise_samples,
        seed=args.seed,
        progress=True,
    )
    print(format_effects(result))
    out = Path(args.out) if args.out else run / "measure"
    out.mkdir(parents=True, exist_ok=True)
    (out / "measure.json").write_text(json.dumps(result, indent=2) + "\n")
    figures = plot_effects(result, out)
    print(f"Wrote {out / 'measure.json'} and {', '.join(figures)}")
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
    demo.set_defaults(handler=_demo)

    train = sub.add_parser("train", help="train the AWD-style LM with one method")
    train.add_argument("config", help="TOML config file (e.g. configs/ptb-small.toml)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    train.add_argument("--out", help="run directory (default runs/<config name>)")
    train.add_argument("--data", help="data directory (default $DROPSPLIT_DATA)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--dry-run", action="store_true", help="3 steps and a short evaluation")
    train.set_defaults(handler=_train)

    measure = sub.add_parser("measure", help="both effects of dropout on a trained run")
    measure.add_argument("run", help="run directory")
    measure.add_argument("--batches", type=int, default=2, help="validation batches (default 2)")
    measure.add_argument("--gap-samples", type=int, default=64)
    measure.add_argument("--noise-samples", type=int, default=32)
    measure.add_argument("--seed", type=int, default=0)
    measure.add_argument("--out", help="output directory (default RUN/measure)")
    measure.add_argument("--data", help="data directory (default $DROPSPLIT_DATA)")
    measure.set_defaults(handler=_measure)

    ev = sub.add_parser("eval", help="perplexity of a run's best weights")
    ev.add_argument("run", help="run directory")
    ev.add_argument("--split", choices=("valid", "test"), default="test")
    ev.add_argument("--data", help="data directory (default $DROPSPLIT_DATA)")
    ev.set_defaults(handler=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dropsplit`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"dropsplit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
