"""The reproduction suite: the paper's experiments as a list of runs, trained resumably.

A suite file (``configs/paper/suite.toml``) names a base config and the runs, each a list of
``--set`` overrides, a group (the paper claim it serves) and whether it belongs to ``--quick``::

    base = "base.toml"
    seeds = 3
    [quick]
    seeds = 1
    set = ["train.epochs=4"]
    [[run]]
    name = "dropout-1"
    group = "a"
    set = ["method.k=1"]
    quick = true
    quick_set = ["train.epochs=2"]   # optional: this run's own --quick overrides, applied last

Run ``r`` with seed index ``i`` trains into ``OUT/<name>/seed<i>`` with ``train.seed = 1111 + i``
(``seeds`` per run may override the suite's; ``first_seed = s``, per suite or run, starts the
indices at ``s``: fresh seeds for runs trained before with seeds ``0 .. s-1``). Runs with several
seeds are trained first, seed by seed (all seed-0 runs, then all seed-1 runs, ...), then
single-seed runs in file order, so a suite stopped early has complete seeds of its headline
runs. A finished run (``summary.json``) is skipped, an interrupted one (``checkpoint.pt``)
resumes, so the suite can be stopped and restarted at will: Ctrl-C or SIGTERM stops it at once
(the runs under way write a last checkpoint where they can), and workers of ``--jobs`` end with
their parent, even a killed one. A run that fails is named and the suite goes on with the others.

Run names become directories: they are letters, digits, ``.``, ``_`` and ``-`` only
(:func:`check_run_name`), and every run directory lies under the output directory
(:func:`run_directory`).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropsplit.data import data_root, ensure_corpus
from dropsplit.training.checkpoint import save_json
from dropsplit.training.config import find_config, load_config, string_override

BASE_SEED = 1111
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_run_name(name: Any, source: str | Path) -> str:
    """``name`` if it can name a run directory: ``[A-Za-z0-9._-]+``, not ``.`` or ``..``.

    Raises:
        ValueError: Naming ``source`` (the suite file or ``run.json``) and the name.
    """
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or not name.strip("."):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:50] + "..."
        raise ValueError(
            f"{source}: run name {shown} must be letters, digits, '.', '_' or '-' (not only "
            "dots): it names a directory under the output directory"
        )
    return name


def run_directory(out: str | Path, name: Any, seed: Any, source: str | Path = "run") -> Path:
    """``out/<name>/seed<seed>``, checked to lie under ``out`` (from a suite file or run.json).

    Raises:
        ValueError: For a name :func:`check_run_name` refuses or a seed that is not an int >= 0.
    """
    check_run_name(name, source)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{source}: seed {seed!r} must be an int >= 0")
    directory = Path(out) / name / f"seed{seed}"
    if not directory.resolve().is_relative_to(Path(out).resolve()):
        raise ValueError(f"{source}: run {name!r} would lie outside {out}")
    return directory


@dataclass(frozen=True)
class RunSpec:
    """One training run of the suite.

    Attributes:
        name: Name of the run (shared by its seeds).
        group: The experiment group (paper claim) it belongs to.
        seed: Seed index.
        overrides: ``section.key=value`` overrides on the base config.
        label: Legend text for figures.
    """

    name: str
    group: str
    seed: int
    overrides: tuple[str, ...]
    label: str

    @property
    def directory(self) -> str:
        """Path of the run relative to the suite's output directory."""
        return f"{self.name}/seed{self.seed}"

    def to_json(self) -> dict[str, Any]:
        """What ``run.json`` records about the run."""
        return {
            "name": self.name,
            "group": self.group,
            "seed": self.seed,
            "label": self.label,
            "overrides": list(self.overrides),
        }


@dataclass(frozen=True)
class Suite:
    """A parsed suite file."""

    path: Path
    base: Path
    description: str
    runs: tuple[RunSpec, ...]


SUITES = Path("configs") / "paper"  # where `--suite NAME` looks: suite-NAME.toml (suite.toml: word)


def suite_names() -> dict[str, Path]:
    """The shipped suites by name.

    ``suite-char-qrnn.toml`` is ``char-qrnn``; ``suite.toml`` (the word-level suite) is ``word``.
    """
    names = {}
    for path in sorted(find_config(SUITES).glob("suite*.toml")):
        name = path.stem.removeprefix("suite").removeprefix("-") or "word"
        names[name] = find_config(SUITES / path.name)
    return dict(sorted(names.items()))


def suite_path(suite: str | Path) -> Path:
    """A suite file from a path or a shipped suite's name (``char-qrnn``; see :func:`suite_names`).

    Raises:
        ValueError: If ``suite`` is neither a path (it has a ``/`` or ends in ``.toml``) nor a name.
    """
    text = str(suite)
    if "/" in text or text.endswith(".toml"):
        return Path(suite)
    names = suite_names()
    if text not in names:
        raise ValueError(f"no suite named {text!r}; the suites are {', '.join(names)}")
    return names[text]


def load_suite(
    path: str | Path,
    quick: bool = False,
    seeds: int | None = None,
    overrides: Sequence[str] = (),
) -> Suite:
    """Read a suite file and expand its runs over seeds.

    Args:
        path: The suite TOML file, or a shipped suite's name (:func:`suite_path`).
        quick: Keep only ``quick = true`` runs, with the ``[quick]`` overrides and seeds.
        seeds: Override the number of seeds of every run.
        overrides: ``section.key=value`` overrides of every run, applied after the suite's own
            (e.g. ``train.device="cuda"``).

    Returns:
        The suite.

    Raises:
        FileNotFoundError: If the suite or its base config is missing.
        ValueError: If a run is malformed or names repeat.
    """
    path = find_config(suite_path(path))
    if not path.exists():
        raise FileNotFoundError(f"suite file {path} does not exist")
    with path.open("rb") as f:
        raw = tomllib.load(f)
    base = path.parent / raw.get("base", "base.toml")
    if not base.exists():
        raise FileNotFoundError(f"base config {base} of suite {path} does not exist")
    quick_cfg = raw.get("quick", {})
    runs, names = [], set()
    for index, entry in enumerate(raw.get("run", [])):
        missing = {"name", "group", "set"} - set(entry)
        if missing:
            raise ValueError(f"{path}: a run lacks {sorted(missing)}: {entry}")
        check_run_name(entry["name"], path)
        if entry["name"] in names:
            raise ValueError(f"{path}: run name {entry['name']!r} repeats")
        names.add(entry["name"])
        if quick and not entry.get("quick", False):
            continue
        run_overrides = tuple(entry["set"])
        if quick:
            run_overrides += tuple(quick_cfg.get("set", ())) + tuple(entry.get("quick_set", ()))
        run_overrides += tuple(overrides)
        n = entry.get("seeds", raw.get("seeds", 1))
        if quick:
            n = quick_cfg.get("seeds", 1)
        if seeds is not None:
            n = seeds
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            where = "--seeds" if seeds is not None else f"{path}: seeds of run {entry['name']!r}"
            raise ValueError(f"{where} must be at least 1, got {n!r} (0 would train nothing)")
        first = entry.get("first_seed", raw.get("first_seed", 0))
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(
                f"{path}: first_seed of run {entry['name']!r} must be an int >= 0, got {first!r}"
            )
        for i in range(first, first + n):
            spec = RunSpec(
                entry["name"],
                entry["group"],
                i,
                (*run_overrides, f"train.seed={BASE_SEED + i}"),
                entry.get("label", entry["name"]),
            )
            runs.append(((n == 1, i, index), spec))
    # multi-seed runs first, seed by seed, so a partial suite has whole seeds of the headline runs
    ordered = tuple(spec for _, spec in sorted(runs, key=lambda pair: pair[0]))
    return Suite(path, base, raw.get("description", ""), ordered)


def run_status(directory: Path) -> str:
    """``"done"``, ``"partial"`` (has a checkpoint) or ``"new"``."""
    if (directory / "summary.json").exists():
        return "done"
    if (directory / "checkpoint.pt").exists():
        return "partial"
    return "new"


MEASURED = ("dropout-1", 0)  # the run whose explicit gap per site the report tabulates


def selected(suite: Suite, only: set[str] | None) -> list[RunSpec]:
    """The runs of ``suite`` that ``only`` names: ``NAME`` (every seed) or ``NAME:SEED``.

    Raises:
        ValueError: If an entry names a run or a seed the suite lacks (a typo would otherwise
            train nothing, silently).
    """
    if only is None:
        return list(suite.runs)
    keys = {r.name for r in suite.runs} | {f"{r.name}:{r.seed}" for r in suite.runs}
    unknown = sorted(only - keys)
    if unknown:
        names = ", ".join(dict.fromkeys(r.name for r in suite.runs))
        raise ValueError(
            f"{suite.path} has no run named {', '.join(unknown)} (NAME or NAME:SEED, seeds from "
            f"0); its runs: {names}"
        )
    return [r for r in suite.runs if r.name in only or f"{r.name}:{r.seed}" in only]


class SuiteInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the suite; the message says how to go on."""


class Finished(list[Path]):
    """The finished run directories (a list), and ``failed``: ``(run, one line)`` per failure."""

    failed: list[tuple[str, str]]


RESUME_HINT = (
    "the suite stopped: run the same command again to go on (finished runs are skipped, "
    "interrupted ones resume from their last checkpoint)"
)


def reproduce(
    suite: Suite,
    out: str | Path,
    data: str | None = None,
    only: set[str] | None = None,
    measure: dict[str, Any] | None = None,
    jobs: int = 1,
    download: bool = True,
) -> Finished:
    """Train every run of ``suite`` not finished yet (resuming interrupted ones).

    A run that fails (a damaged checkpoint, a diverged run, a full disk) is named on one line and
    the suite goes on with the others; the failures are in the result's ``failed``. Ctrl-C or
    SIGTERM stops the whole suite at once: the runs under way are sent SIGTERM (each ends its
    step and writes a last checkpoint) and :class:`SuiteInterrupted` says how to go on.

    Args:
        suite: The suite.
        out: Output directory of the runs.
        data: Data directory (default ``$DROPSPLIT_DATA``).
        only: The runs to train, ``NAME`` (every seed) or ``NAME:SEED`` (default all).
        measure: Keyword arguments of :func:`~dropsplit.training.runs.measure_run` for the Dropout_1
            run of seed 0, measured as soon as it is finished (``None``: no measurement).
        jobs: Runs trained at once, each in its own process with ``1 / jobs`` of the torch
            threads (small models use two cores better as two one-thread runs than as one
            two-thread run). The runs do not depend on ``jobs`` (up to the float rounding of
            another thread count). A worker ends when its parent does (killed included).
        download: Fetch the corpora the suite reads when they are missing (once, before any
            run starts); ``False``: a missing corpus is an error that says how to provide it.

    Returns:
        The run directories of the suite that are finished (a list, with ``failed``).

    Raises:
        ValueError: If ``jobs`` is not a positive int or ``only`` names a run or seed the suite
            lacks.
        SuiteInterrupted: On Ctrl-C or SIGTERM.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    corpora = {load_config(suite.base, list(r.overrides)).data.corpus for r in suite.runs}
    for corpus in sorted(corpora - {"synthetic"}):
        ensure_corpus(corpus, data_root(data), download)
    todo = selected(suite, only)
    out = Path(out)
    started = time.perf_counter()
    tasks = [
        (spec, f"[{i}/{len(todo)}] {spec.directory}", suite.base, out, data, measure, started)
        for i, spec in enumerate(todo, 1)
    ]
    failed: list[tuple[str, str]] = []
    with _suite_signals():
        try:
            if jobs == 1:
                for task in tasks:
                    _guarded(failed, task[0], task[1], _run_one, *task)
            else:
                _run_parallel(tasks, jobs, failed)
        except KeyboardInterrupt as err:
            raise SuiteInterrupted(RESUME_HINT) from err
    done = Finished()
    for spec in suite.runs:
        directory = out / spec.directory
        if run_status(directory) != "done":
            continue
        problem = unreportable(directory)
        if problem is None:
            done.append(directory)
        else:
            print(f"{spec.directory}: FAILED: {problem}", flush=True)
            failed.append((spec.directory, problem))
    done.failed = failed
    return done


def unreportable(directory: Path) -> str | None:
    """Why a finished run cannot go into the report (one line), or ``None``.

    A ``summary.json`` that is not JSON, a run that never had a finite validation loss (it
    diverged), or files that lack what the report reads
    (:func:`~dropsplit.experiments.report.run_problem`) would break the whole suite's report: it
    is left out and named instead.
    """
    path = directory / "summary.json"
    try:
        summary = json.loads(path.read_text())
        best = summary["best_val_loss"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path} cannot be read ({err}): left out of the report; train the run again"
    if isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best):
        return (
            f"{path}: the run diverged (best validation loss {best}): left out of the report; "
            "train it again (another optim.lr) with --overwrite"
        )
    from dropsplit.experiments.report import run_problem

    problem = run_problem(directory)  # what the report reads: test_ppl, an evaluation, ...
    return None if problem is None else f"left out of the report: {problem}"


def _guarded(failed: list, spec: RunSpec, head: str, call: Any, *args: Any, **kwargs: Any) -> None:
    """``call(*args)``; an error (not an interrupt) is named on one line and kept in ``failed``."""
    try:
        call(*args, **kwargs)
    except Exception as err:  # the suite goes on; the line names the run and what to do
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        line = text if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {text}"
        print(f"{head}: FAILED: {line}", flush=True)
        failed.append((spec.directory, line))


class _suite_signals:  # noqa: N801 (a context manager used as a statement)
    """SIGTERM raises :class:`SuiteInterrupted` in the main thread while the suite runs."""

    def __enter__(self) -> None:
        self.previous = None
        if threading.current_thread() is threading.main_thread():

            def on_term(signum: int, frame: Any) -> None:
                raise SuiteInterrupted(RESUME_HINT)

            self.previous = signal.signal(signal.SIGTERM, on_term)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _run_parallel(tasks: list, jobs: int, failed: list) -> None:
    """The tasks on ``jobs`` worker processes; an interrupt stops the workers and the rest."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # no fork of a threaded torch
    pool = ProcessPoolExecutor(
        jobs, context, initializer=_worker_start, initargs=(threads, jobs, os.getpid())
    )
    try:
        futures = [(task, pool.submit(_run_in_worker, *task, False)) for task in tasks]
        for task, future in futures:
            _guarded(failed, task[0], task[1], future.result)
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown()


WORKER_GRACE_S = 60.0  # how long a worker told to stop may take to write its last checkpoint


def _stop_workers(pool: Any) -> None:
    """Cancel what has not started; SIGTERM the workers (a last checkpoint), then kill."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: the trainer ends its step with a checkpoint
    deadline = time.monotonic() + WORKER_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(5)


def _worker_start(threads: int, jobs: int, parent: int) -> None:
    """A worker's set-up: its share of the cores, and a watchdog that ends it with its parent."""
    import torch

    from dropsplit.training.threads import share_cores

    torch.set_num_threads(threads)
    share_cores(jobs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # a training run ends its step with a checkpoint
        time.sleep(WORKER_GRACE_S)
        os._exit(143)

    threading.Thread(target=watch, daemon=True, name="dropsplit-parent-watch").start()


def _run_in_worker(*task: Any) -> None:
    """:func:`_run_one` in a worker; stopped by SIGTERM, the worker ends (it trains no more)."""
    try:
        _run_one(*task)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143)


def _run_one(
    spec: RunSpec,
    head: str,
    base: Path,
    out: Path,
    data: str | None,
    measure: dict[str, Any] | None,
    started: float,
    show_progress: bool = True,
) -> None:
    """Train (or resume, or skip) one run of the suite, then measure it if it is MEASURED."""
    from dropsplit.training.runs import measure_run
    from dropsplit.training.trainer import train

    directory = run_directory(out, spec.name, spec.seed, spec.name)
    status = run_status(directory)
    wants_measure = measure is not None and (spec.name, spec.seed) == MEASURED
    if status == "done":
        print(f"{head}: finished, skipped", flush=True)
        if wants_measure and not (directory / "measure" / "measure.json").exists():
            measure_run(directory, data=data, **(measure or {}))
        return
    overrides = list(spec.overrides) + ([string_override("data.path", data)] if data else [])
    config = load_config(base, overrides)
    directory.mkdir(parents=True, exist_ok=True)
    save_json(spec.to_json(), directory / "run.json")
    verb = "resuming" if status == "partial" else "training"
    print(f"{head}: {verb} ({time.perf_counter() - started:.0f} s so far)", flush=True)
    # "new": nothing, or what a start killed before its first checkpoint left: start clean
    summary = train(
        config,
        directory,
        resume=status == "partial",
        overwrite=status == "new",
        show_progress=show_progress,
    )
    print(
        f"{head}: best valid ppl {summary['best_val_ppl']:.2f}, {summary['train_seconds']:.0f} s",
        flush=True,
    )
    if wants_measure:
        print(f"{head}: measuring both effects of dropout on it", flush=True)
        measure_run(directory, data=data, **(measure or {}))
