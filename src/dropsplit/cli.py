"""The ``dropsplit`` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

from dropsplit.fetch import CORPUS_NAMES, FetchError


def _demo(args: argparse.Namespace) -> int:
    from dropsplit.experiments.demo import print_report, run_demo

    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    numbers = run_demo(train_steps=args.steps, q=args.q, seed=args.seed)
    print_report(numbers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
        print(f"Numbers written to {args.json}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dropsplit.training.config import load_config, string_override
    from dropsplit.training.trainer import train

    overrides = list(args.set or [])
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if args.data:
        overrides.append(string_override("data.path", args.data))
    if args.no_download:
        overrides.append("data.download=false")
    config = load_config(args.config, overrides)
    out = args.out or f"runs/{Path(args.config).stem}"
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.dry_run:
        return _dry_run(args.config, config, Path(out), resume=args.resume)
    summary = train(config, out, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one line for the run, not per rank
        return 0
    print(_result_line(out, summary))
    return 0


def _result_line(out: str, summary: dict[str, Any]) -> str:
    """A trained run in one line: perplexities (a classifier: loss, accuracy) and throughput."""
    if "test_accuracy" in summary:  # a classifier: examples per second
        quality = (
            f"best valid loss {summary['best_val_loss']:.4f}, "
            f"test accuracy {summary['test_accuracy']:.4f}"
        )
        unit = "examples/s"
    else:
        quality = (
            f"best valid ppl {summary['best_val_ppl']:.2f}, test ppl {summary['test_ppl']:.2f}"
        )
        unit = "tokens/s"
    return (
        f"{out}: {quality}, {summary['steps']} steps ({summary['skipped_steps']} skipped), "
        f"{summary['tokens_per_second']:.0f} {unit}"
    )


def _dry_run(name: str, config: Any, out: Path, *, resume: bool) -> int:
    """``train --dry-run``: 3 steps and a short evaluation in a temporary directory, removed after.

    Nothing lasts (``out`` is not touched, so the real run is not blocked) and no perplexity is
    printed: after 3 steps it is no result.
    """
    import math
    import tempfile

    from dropsplit.training.trainer import train

    if resume:
        raise ValueError("--dry-run and --resume exclude each other (a dry run keeps nothing)")
    # each process (each torchrun rank) its own directory: no file is read across ranks here
    with tempfile.TemporaryDirectory(prefix="dropsplit-dry-run-") as tmp:
        summary = train(config, tmp, dry_run=True)
    if os.environ.get("RANK", "0") != "0":
        return 0
    finite = math.isfinite(summary["test_loss"])
    print(
        f"dry run {'OK' if finite else 'FAILED'}: {name} ran {summary['steps']} steps and a short "
        f"evaluation ({'losses finite' if finite else 'the test loss is not finite'}) in a "
        f"temporary directory, now removed. Nothing was written and no result is reported; "
        f"without --dry-run it trains into {out}."
    )
    if (out / "checkpoint.pt").exists():
        print(f"note: {out} already holds a run: the real run needs --resume, --overwrite or --out")
    return 0 if finite else 1


def _data(args: argparse.Namespace) -> int:
    from dropsplit.data import data_root
    from dropsplit.fetch import CORPUS_FILES, LICENSES, cache_dir, decompressed_digest, fetch

    if args.action == "fetch":  # --to DIR is created by fetch (and removed if the fetch fails)
        root = Path(args.dir) if args.dir else data_root(None)
        paths = fetch(args.names, root, mirror=args.mirror)
        print(f"{len(paths)} files verified in {root}")
        return 0
    if args.action == "verify" and not args.dir and args.require:
        last = args.require[-1]  # `verify --require ptb DIR`: DIR came last
        if last not in CORPUS_NAMES and (os.sep in last or Path(last).is_dir()):
            args.dir = args.require.pop()
    for name in args.require if args.action == "verify" else []:
        if name not in CORPUS_NAMES:
            raise ValueError(
                f"--require: unknown corpus {name!r} (names: {', '.join(CORPUS_NAMES)})"
            )
    # list and verify only read: the user cache is not created for them
    default = not args.dir and not os.environ.get("DROPSPLIT_DATA")
    root = cache_dir() if default else data_root(args.dir)
    if args.action == "verify":
        return _verify(root, args.require)
    print(f"data directory: {root}")
    for f in CORPUS_FILES:
        path = root / f.relative
        digest = decompressed_digest(path, f) if path.exists() else None
        state = "missing" if not path.exists() else "ok" if digest == f.checksum else "CORRUPT"
        size = f"{f.bytes:>11,} B" if f.bytes else "   size unknown"
        print(f"{f.relative:30} {size}  {f.checksum[:23]}…  {state}")
        source = f"{f.url} ({f.member})" if f.member else f.url
        print(f"  source {source}  ({LICENSES[f.corpus]})")
    return 0


def _verify(root: Path, required: list[str]) -> int:
    """``data verify``: the exit status of a check of every corpus present in ``root``.

    0 if every corpus present verifies, 1 if a required one is not fetched, 2 if one is corrupt
    or incomplete (a file corrupt, or missing beside its corpus's others).
    """
    from dropsplit.fetch import decompressed_digest, files_of

    print(f"data directory: {root}")
    verified: list[str] = []
    absent: list[str] = []
    broken: list[str] = []
    for name in CORPUS_NAMES:
        files = files_of(name)
        if not any((root / f.relative).exists() for f in files):
            print(f"{name + '/':30} not fetched")
            absent.append(name)
            continue
        states: list[str] = []
        for f in files:
            path = root / f.relative
            digest = decompressed_digest(path, f) if path.exists() else None
            states.append(
                "missing" if not path.exists() else "ok" if digest == f.checksum else "CORRUPT"
            )
            print(f"{f.relative:30} {states[-1]}")
        (verified if set(states) == {"ok"} else broken).append(name)
    unmet = [name for name in dict.fromkeys(required) if name in absent]
    error = "dropsplit data: error:"
    if broken:
        names = " ".join(broken)
        print(
            f"{error} corrupt or incomplete: {', '.join(broken)} "
            f"(`dropsplit data fetch {names} --to {root}` fetches the bad files again)",
            file=sys.stderr,
        )
    if unmet:
        names = " ".join(unmet)
        print(
            f"{error} required but not fetched: {', '.join(unmet)} "
            f"(`dropsplit data fetch {names} --to {root}` fetches them)",
            file=sys.stderr,
        )
    if broken or unmet:
        return 2 if broken else 1
    listed = ", ".join(verified) if verified else "no corpus"
    print(f"verified: {listed}; not fetched: {', '.join(absent) if absent else 'none'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import math

    from dropsplit.training.runs import load_task_run

    run = Path(args.run)
    _, task, model = load_task_run(run, args.data, args.threads)
    result = task.evaluate(model, args.split, show_progress=True)
    loss = result.loss
    extra = "".join(f", {k} {v:.4f}" for k, v in result.metrics.items())
    print(f"{run} {args.split}: loss {loss:.4f}, ppl {math.exp(min(loss, 50.0)):.2f}{extra}")
    return 0


def _measure(args: argparse.Namespace) -> int:
    from dropsplit.measure.effects import format_effects
    from dropsplit.training.runs import measure_run

    target = Path(args.out) if args.out else Path(args.run) / "measure"
    if (target / "measure.json").exists() and not args.overwrite:
        raise FileExistsError(
            f"{target} already holds a measurement (measure.json): pass --overwrite to replace "
            "it, or --out DIR to write beside it"
        )
    result, out, figures = measure_run(
        Path(args.run),
        batches=args.batches,
        gap_samples=args.gap_samples,
        noise_samples=args.noise_samples,
        full_samples=args.full_samples,
        q=args.q,
        seed=args.seed,
        out=args.out,
        data=args.data,
        threads=args.threads,
    )
    print(format_effects(result))
    print(f"Wrote {out / 'measure.json'} and {', '.join(figures)}")
    return 0


def _noise_scale(args: argparse.Namespace) -> int:
    from dropsplit.training.runs import noise_scale_run

    r, path = noise_scale_run(
        Path(args.run),
        batches=args.batches,
        samples=args.samples,
        seed=args.seed,
        data=args.data,
        threads=args.threads,
    )
    print(
        f"dropout noise trace {r['dropout']:.4g} +- {r['dropout_stderr']:.2g}, minibatch noise "
        f"trace {r['minibatch']:.4g} +- {r['minibatch_stderr']:.2g} ({r['batches']} batches of "
        f"{r['batch_size']}): ratio {r['ratio']:.3g}"
    )
    print(f"Wrote {path}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from dropsplit.experiments.report import write_report
    from dropsplit.experiments.reproduce import load_suite, reproduce, suite_path
    from dropsplit.optional import require

    require("matplotlib", "the report of reproduce")  # before hours of training, not after
    args.suite = suite_path(args.suite).as_posix()  # a name (char-qrnn) becomes its file
    overrides = [*(args.set or []), *([f"train.threads={args.threads}"] if args.threads else [])]
    suite = load_suite(args.suite, quick=args.quick, seeds=args.seeds, overrides=overrides)
    out = Path(args.out or default_out(args.suite, args.quick))
    if args.quick:
        print(
            "dropsplit reproduce --quick: a REDUCED suite (few runs, one seed, few epochs) that "
            "runs the headline comparison in minutes (one seed: no test); the full suite is "
            "`dropsplit reproduce`.",
            flush=True,
        )
    only = set(args.only) if args.only else None
    size = {"batches": 1, "gap_samples": 16, "noise_samples": 8} if args.quick else {}
    measure = None if args.no_measure else size
    done = reproduce(
        suite,
        out,
        data=args.data,
        only=only,
        measure=measure,
        jobs=args.jobs,
        download=not args.no_download,
    )
    failed = getattr(done, "failed", [])
    if not done:
        print("no finished runs yet: nothing to report")
        return 1 if failed else 0
    report_dir = Path(args.report or out / "report")
    command = _report_command(report_dir, args.suite, args.quick, args.seeds)
    report = write_report(done, report_dir, suite, command)
    print(f"Report: {report}")
    if failed:  # the finished runs have their report; the failed ones are named again
        names = ", ".join(run for run, _ in failed)
        print(f"dropsplit reproduce: {len(failed)} run(s) FAILED: {names}", file=sys.stderr)
        return 1
    return 0


def default_out(suite: str, quick: bool) -> str:
    """Run directory of a suite: ``suite-char.toml`` -> ``runs/paper-char`` (+ ``-quick``)."""
    name = Path(suite).stem.replace("suite", "paper", 1)
    return f"runs/{name}-quick" if quick else f"runs/{name}"


def _report_command(out, suite: str | None, quick: bool, seeds: int | None) -> str:
    """The ``dropsplit report`` command that regenerates a report from its own copies."""
    command = f"dropsplit report {out}/runs/*/* --out {out}"
    if suite:
        command += f" --suite {suite}" + (" --quick" if quick else "")
        command += f" --seeds {seeds}" if seeds else ""
    return command


def _report(args: argparse.Namespace) -> int:
    from dropsplit.experiments.report import write_report
    from dropsplit.experiments.reproduce import load_suite

    suite = load_suite(args.suite, quick=args.quick, seeds=args.seeds) if args.suite else None
    command = _report_command(args.out, args.suite, args.quick, args.seeds)
    costs = None
    if args.step_costs:
        path = Path(args.step_costs)
        try:
            rows = json.loads(path.read_text())["rows"]
            costs = {name: row["ratio_median"] for name, row in rows.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"--step-costs {path} is not a `dropsplit bench --json` file (no rows with "
                f"ratio_median: {type(e).__name__} {e}): give the file `dropsplit bench --json` "
                "wrote"
            ) from e
    report = write_report(args.runs, args.out, suite, command, step_costs=costs)
    print(f"Report: {report}")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    from dropsplit.experiments.matrix import write_matrix

    mixed = " --allow-mixed-code" if args.allow_mixed_code else ""
    command = f"dropsplit matrix {args.columns} --out {args.out}{mixed}"
    print(f"Report: {write_matrix(args.columns, args.out, command, args.allow_mixed_code)}")
    return 0


LONG_WORD = re.compile(r"[^\s'\":,;]{121,}")  # a path or value too long to echo whole


def shortened(text: str) -> str:
    """``text`` with every word over 120 characters cut to its ends and its length.

    A 10 MB path echoed whole would be a 10 MB error line.
    """
    return LONG_WORD.sub(lambda m: f"{m[0][:50]}...{m[0][-30:]} ({len(m[0]):,} characters)", text)


def error_line(err: BaseException) -> str:
    """What the CLI prints for ``err`` after ``error:``: its message, long words shortened.

    A system error on a path (``[Errno 36] File name too long: '...'``) names the path, cut.
    """
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        paths = [str(err.filename)] + ([str(err.filename2)] if err.filename2 else [])
        text = f"{' -> '.join(paths)}: {err.strerror}"
    else:
        text = str(err)
    return shortened(text.strip() or type(err).__name__)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors echo no huge value (``invalid choice: 'x...'``)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``message`` with long words shortened, exit 2."""
        super().error(shortened(message))


DATA_HELP = "data directory (default $DROPSPLIT_DATA, else the user cache ~/.cache/dropsplit)"
NO_DOWNLOAD = "do not fetch a missing corpus (a clear error says how to provide it)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per job."""
    parser = _Parser(
        prog="dropsplit",
        description="The explicit and implicit regularization effects of dropout.",
    )
    parser.add_argument("--version", action="version", version=f"dropsplit {version('dropsplit')}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_and_train(sub)
    _add_measure_commands(sub)
    _add_suite_commands(sub)
    _add_data_and_run_commands(sub)
    return parser


THREADS_HELP = (
    "intra-op threads (default: 1 for a model under 20M parameters, else this process's "
    "share of the cores; OMP_NUM_THREADS, when set, is kept)"
)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive, default=0, metavar="N", help=THREADS_HELP)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_demo_and_train(sub: Any) -> None:
    """``demo`` and ``train``."""
    demo = sub.add_parser(
        "demo",
        help="train a tiny recurrent LM and measure both effects per site (no data; about 2 "
        "CPU-minutes on a 2-core AMD EPYC)",
    )
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--q", type=float, default=0.3, help="drop probability (default 0.3)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, model, draws")
    demo.add_argument("--json", help="also write the numbers to this JSON file")
    demo.set_defaults(handler=_demo)

    train = sub.add_parser(
        "train",
        help="train a language model (LSTM, QRNN or Transformer: the config's model.name) "
        "with one method",
    )
    train.add_argument("config", help="TOML config file (e.g. configs/ptb-small.toml)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    train.add_argument("--out", help="run directory (default runs/<config name>)")
    train.add_argument("--data", help=DATA_HELP)
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="delete the run already in --out, start again"
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="3 steps and a short evaluation in a temporary directory (removed; --out untouched)",
    )
    train.add_argument("--no-download", action="store_true", help=NO_DOWNLOAD)
    _add_threads(train)
    train.set_defaults(handler=_train)


def _add_measure_commands(sub: Any) -> None:
    """``measure`` and ``noise-scale``: what dropout does in a trained run."""
    measure = sub.add_parser("measure", help="both effects of dropout on a trained run")
    measure.add_argument("run", help="run directory")
    measure.add_argument("--batches", type=int, default=2, help="validation batches (default 2)")
    measure.add_argument(
        "--gap-samples", type=int, default=64, help="mask draws of the explicit gap per site"
    )
    measure.add_argument(
        "--noise-samples", type=int, default=32, help="draws of each gradient noise (default 32)"
    )
    measure.add_argument(
        "--full-samples",
        type=int,
        default=0,
        help="Hutchinson draws of the whole second-order term, model curvature included "
        "(default 0: skip; a double backward each)",
    )
    measure.add_argument(
        "--q", type=float, help="measure with every dropping site at this q (default: trained)"
    )
    measure.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    measure.add_argument("--out", help="output directory (default RUN/measure)")
    measure.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a measurement already in the output directory (without it: an error)",
    )
    measure.add_argument("--data", help="data directory (default $DROPSPLIT_DATA)")
    _add_threads(measure)
    measure.set_defaults(handler=_measure)

    scale = sub.add_parser(
        "noise-scale", help="dropout's gradient noise against plain SGD's minibatch noise"
    )
    scale.add_argument("run", help="run directory (writes RUN/noise_scale.json)")
    scale.add_argument(
        "--batches", type=int, default=16, help="training batches (default 16, at least 2)"
    )
    scale.add_argument("--samples", type=int, default=8, help="masks per batch (default 8)")
    scale.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")
    scale.add_argument("--data", help="data directory (default $DROPSPLIT_DATA)")
    _add_threads(scale)
    scale.set_defaults(handler=_noise_scale)


def _add_suite_commands(sub: Any) -> None:
    """``reproduce`` and ``report``: the paper's suite and its report."""
    rep = sub.add_parser(
        "reproduce", help="train the paper's experiment suite (resumable) and write the report"
    )
    rep.add_argument(
        "--quick",
        action="store_true",
        help="the suite's reduced form (its [quick] section: one seed, few runs); for char, 3 "
        "runs selected on the first 14,000 validation characters, 4.7 min with --jobs 2 on 2 "
        "cores, AMD EPYC (docs/results/paper-char-quick/REPORT.md)",
    )
    rep.add_argument(
        "--suite",
        default="configs/paper/suite-char.toml",
        help="suite file or name: char (the default), char-qrnn, char-transformer, char-wt2, "
        "char-time, word (configs/paper/suite-NAME.toml; word: suite.toml)",
    )
    rep.add_argument(
        "--out", help="run directory (default runs/paper-char[-quick] for suite-char.toml)"
    )
    rep.add_argument("--report", help="report directory (default OUT/report)")
    rep.add_argument("--seeds", type=int, help="seeds per run (default: the suite's)")
    rep.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="train only these runs: NAME (every seed) or NAME:SEED (one seed, from 0)",
    )
    rep.add_argument("--no-measure", action="store_true", help="skip measuring Dropout_1")
    rep.add_argument("--no-download", action="store_true", help=NO_DOWNLOAD)
    rep.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, one process each (default 1)"
    )
    rep.add_argument("--data", help="data directory (default $DROPSPLIT_DATA)")
    rep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of every run's config, after the suite's own (e.g. train.device=\"cuda\")",
    )
    _add_threads(rep)
    rep.set_defaults(handler=_reproduce)

    report = sub.add_parser("report", help="tables, figures and verdicts from suite runs")
    report.add_argument("runs", nargs="+", help="run directories (OUT/<name>/seed<i>)")
    report.add_argument("--out", required=True, help="report directory")
    report.add_argument("--suite", help="suite file, to list the runs not run yet")
    report.add_argument("--quick", action="store_true", help="the suite is the --quick one")
    report.add_argument("--seeds", type=int, help="seeds per run the suite was run with")
    report.add_argument(
        "--step-costs",
        help="a `dropsplit bench --json` file: its ratios go to OUT/step_costs.json, read by "
        "the practitioner's table (kept there for later regenerations)",
    )
    report.set_defaults(handler=_report)

    matrix = sub.add_parser(
        "matrix", help="one verdict table across the suites' reports (a column per configuration)"
    )
    matrix.add_argument("columns", help="matrix file (configs/paper/matrix.toml)")
    matrix.add_argument("--out", required=True, help="report directory")
    matrix.add_argument(
        "--allow-mixed-code",
        action="store_true",
        help="write cells whose comparisons mix runs trained by different code versions "
        "(marked ‡) instead of refusing",
    )
    matrix.set_defaults(handler=_matrix)


def _add_data_and_run_commands(sub: Any) -> None:
    """``bench``, ``data`` and ``eval``."""
    # `dropsplit bench ...` is handed to dropsplit.experiments.benchmark whole (see main)
    sub.add_parser("bench", help="time and memory per step of every method (see --help)")

    data = sub.add_parser("data", help="the standard corpora: list, fetch, verify")
    data_sub = data.add_subparsers(dest="action", required=True)
    listing = data_sub.add_parser("list", help="each corpus file, its source and whether present")
    listing.add_argument("--data", dest="dir", help=DATA_HELP)
    corpora = ", ".join(CORPUS_NAMES)
    get = data_sub.add_parser(
        "fetch",
        help="download, verify and store corpora",
        description=f"Download, verify and store corpora ({corpora}).",
    )
    get.add_argument(
        "names", nargs="+", choices=CORPUS_NAMES, metavar="NAME", help=f"corpora: {corpora}"
    )
    get.add_argument("--to", dest="dir", help="data directory to fill (default: as for --data)")
    get.add_argument(
        "--mirror", help="base URL serving URL/<corpus>/<file> (default $DROPSPLIT_MIRROR)"
    )
    check = data_sub.add_parser(
        "verify",
        help="check the checksum of every corpus file present",
        description=f"Check the checksum of every file of each corpus present ({corpora}); "
        "a corpus with none of its files is listed as not fetched.",
        epilog="exit status: 0 every corpus present verifies (absent ones are listed as not "
        "fetched), 1 a --require'd corpus is not fetched, 2 a corpus is corrupt or incomplete",
    )
    check.add_argument("dir", nargs="?", help="data directory (default: as for --data)")
    check.add_argument(
        "--require",
        nargs="+",
        default=[],
        metavar="NAME",
        help=f"corpora that must be present (absent: exit 1); names: {corpora}",
    )
    data.set_defaults(handler=_data)

    ev = sub.add_parser("eval", help="perplexity of a run's best weights")
    ev.add_argument("run", help="run directory")
    ev.add_argument(
        "--split", choices=("valid", "test"), default="test", help="split (default test)"
    )
    ev.add_argument("--data", help="data directory (default $DROPSPLIT_DATA)")
    _add_threads(ev)
    ev.set_defaults(handler=_eval)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dropsplit`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from dropsplit.experiments.benchmark import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    # OSError: a disk full or a read-only directory (dropsplit's own say which file, and the fix)
    except (ValueError, OSError, FetchError, ImportError) as err:
        print(f"dropsplit {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        from dropsplit.experiments.reproduce import SuiteInterrupted

        detail = str(err) if isinstance(err, SuiteInterrupted) else ""
        print(
            f"dropsplit {args.command}: interrupted ("
            + (detail or "a training run continues with --resume")
            + ")",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
