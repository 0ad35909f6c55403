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
(``seeds`` per run may override the suite's). Runs with several seeds are trained first, seed by
seed (all seed-0 runs, then all seed-1 runs, ...), then single-seed runs in file order, so a
suite stopped early has complete seeds of its headline runs. A finished run (``summary.json``)
is skipped, an interrupted one (``checkpoint.pt``) resumes, so the suite can be stopped and
restarted at will.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropsplit.data import data_root, ensure_corpus
from dropsplit.training.config import find_config, load_config, string_override

BASE_SEED = 1111


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
        for i in range(n):
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


def reproduce(
    suite: Suite,
    out: str | Path,
    data: str | None = None,
    only: set[str] | None = None,
    measure: dict[str, Any] | None = None,
    jobs: int = 1,
    download: bool = True,
) -> list[Path]:
    """Train every run of ``suite`` not finished yet (resuming interrupted ones).

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
            another thread count).
        download: Fetch the corpora the suite reads when they are missing (once, before any
            run starts); ``False``: a missing corpus is an error that says how to provide it.

    Returns:
        The run directories of the suite that are finished.

    Raises:
        ValueError: If ``jobs`` is not a positive int or ``only`` names a run or seed the suite
            lacks.
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
    if jobs == 1:
        for task in tasks:
            _run_one(*task)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch

        threads = max(1, torch.get_num_threads() // jobs)
        context = multiprocessing.get_context("spawn")  # no fork of a threaded torch
        with ProcessPoolExecutor(
            jobs, context, initializer=torch.set_num_threads, initargs=(threads,)
        ) as pool:
            for future in [pool.submit(_run_one, *task, show_progress=False) for task in tasks]:
                future.result()
    return [out / r.directory for r in suite.runs if run_status(out / r.directory) == "done"]


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

    directory = out / spec.directory
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
    if status == "new":  # killed before its first checkpoint: start clean
        (directory / "metrics.jsonl").unlink(missing_ok=True)
    (directory / "run.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    verb = "resuming" if status == "partial" else "training"
    print(f"{head}: {verb} ({time.perf_counter() - started:.0f} s so far)", flush=True)
    summary = train(config, directory, resume=status == "partial", show_progress=show_progress)
    print(
        f"{head}: best valid ppl {summary['best_val_ppl']:.2f}, {summary['train_seconds']:.0f} s",
        flush=True,
    )
    if wants_measure:
        print(f"{head}: measuring both effects of dropout on it", flush=True)
        measure_run(directory, data=data, **(measure or {}))
