"""The results report: tables, figures and a verdict per paper claim, from run summaries.

``dropsplit report RUN_DIRS... --out DIR`` copies the small files of each run (``run.json``,
``summary.json``, ``metrics.jsonl``, ``measure/measure.json``) to ``DIR/runs/<name>/seed<i>/``
and writes ``DIR/REPORT.md``, ``DIR/summary.csv`` and the figures from those copies only, so
running it again on ``DIR/runs/*/*`` regenerates every file byte for byte. Every file is written
atomically (a kill leaves the old file or the new one, whole); the run name and seed of
``run.json`` must make a directory under ``DIR/runs``, and a run whose files lack what the report
reads (no ``test_ppl``, no evaluation) is a one-line error naming the file.

The claims and their verdict rules are data: :mod:`~dropsplit.experiments.claims`. A run whose
best evaluation lies in the last 10 % of its budget is marked † (budget-limited) in every table
and figure (:func:`~dropsplit.experiments.claims.budget_limited`).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from dropsplit.experiments.claims import (
    CLAIMS,
    LIMITED,
    NOT_RUN,
    RULES,
    Runs,
    Stat,
    arms,
    budget_limited,
    code_version_text,
    judge_claims,
    longer_budgets,
    stat,
)
from dropsplit.experiments.practice import practitioner_lines
from dropsplit.experiments.reproduce import check_run_name, run_directory
from dropsplit.experiments.time_to_quality import (
    plot_ratio_curve,
    plot_time_to_quality,
    ratio_curves,
    ratio_lines,
    time_to_quality_lines,
)
from dropsplit.optional import require
from dropsplit.training.checkpoint import atomic_write, save_text

COPIED = ("run.json", "summary.json", "metrics.jsonl", "noise_scale.json")  # when present
MEASUREMENTS = "measure*/measure.json"  # `dropsplit measure` outputs: measure/, measure-q0.05/, ...
# what the report reads of each run: a file without one of them is named, not a traceback
SUMMARY_NUMBERS = ("best_val_ppl", "test_ppl", "epochs", "train_seconds", "seconds_per_step")
METRIC_NUMBERS = ("step", "epoch", "val_ppl", "seconds")
INCOMPLETE = (
    "finish the run (dropsplit reproduce resumes it) or train it again, or leave its directory "
    "out of the report"
)


@dataclass
class Run:
    """One seed of one run: its spec, summary and metrics."""

    name: str
    group: str
    seed: int
    label: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    directory: Path
    measures: dict[str, dict[str, Any]] = field(default_factory=dict)  # by directory name
    noise_scale: dict[str, Any] | None = None  # `dropsplit noise-scale` output, if measured

    @property
    def measure(self) -> dict[str, Any] | None:
        """The measurement at the trained probabilities (``measure/``), if any."""
        return self.measures.get("measure")

    @property
    def limited(self) -> bool:
        """Whether its best evaluation lies in the last 10 % of its budget (budget-limited)."""
        return budget_limited(self.summary, self.metrics)


def limited_seeds(runs: list[Run]) -> int:
    """How many of a run's seeds are budget-limited."""
    return sum(r.limited for r in runs)


def marked(runs: list[Run], text: str | None = None) -> str:
    """``text`` (the run's label) with † when a seed of the run is budget-limited."""
    return (runs[0].label if text is None else text) + (LIMITED if limited_seeds(runs) else "")


def _json(path: Path) -> Any:
    """The JSON of ``path``.

    Raises:
        ValueError: If it is not JSON (one line naming the file and what to do).
    """
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err}): {INCOMPLETE}") from err


def _numbers(record: Any, keys: tuple[str, ...], where: str) -> None:
    """Refuse a record that is not an object with a number under each of ``keys``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object: {INCOMPLETE}")
    for key in keys:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            what = "no" if value is None else f"a non-number {str(value)[:40]!r} as"
            raise ValueError(f"{where} has {what} {key}: {INCOMPLETE}")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The evaluations of ``metrics.jsonl``, each with the numbers the report reads.

    Raises:
        ValueError: If a line is not JSON or lacks a number, or the file holds no evaluation.
    """
    metrics = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {i} is not JSON ({err}): {INCOMPLETE}") from err
        _numbers(record, METRIC_NUMBERS, f"{path} line {i}")
        metrics.append(record)
    if not metrics:
        raise ValueError(f"{path} holds no evaluation: {INCOMPLETE}")
    return metrics


def read_spec(path: Path) -> dict[str, Any]:
    """``run.json``: a run name that makes a directory (:func:`check_run_name`) and a seed.

    Raises:
        ValueError: If it is not JSON, lacks ``name``, ``group`` or ``seed``, or its name or
            seed cannot make a directory under the report's.
    """
    spec = _json(path)
    if not isinstance(spec, dict):
        raise ValueError(f"{path} is not a JSON object: {INCOMPLETE}")
    for key in ("name", "group", "seed"):
        if key not in spec:
            raise ValueError(f"{path} has no {key}: it is not a run.json of dropsplit reproduce")
    check_run_name(spec["name"], path)
    run_directory(".", spec["name"], spec["seed"], path)  # the seed: an int >= 0
    return spec


def load_runs(directories: Iterable[str | Path]) -> list[Run]:
    """Read run directories written by ``dropsplit reproduce`` (skips unfinished ones).

    Raises:
        FileNotFoundError: If a directory has no ``run.json``.
        ValueError: If a file is not JSON, ``run.json`` names a run that cannot be a directory,
            or ``summary.json`` or ``metrics.jsonl`` lacks what the report reads (one line
            naming the file).
    """
    runs = []
    for d in directories:
        d = Path(d)
        spec_path = d / "run.json"
        if not spec_path.exists():
            raise FileNotFoundError(f"{d} is not a suite run (no run.json)")
        if not (d / "summary.json").exists():
            continue
        spec = read_spec(spec_path)
        summary = _json(d / "summary.json")
        _numbers(summary, SUMMARY_NUMBERS, str(d / "summary.json"))
        if not isinstance(summary.get("config"), dict):
            raise ValueError(f"{d / 'summary.json'} has no config: {INCOMPLETE}")
        metrics = read_metrics(d / "metrics.jsonl")
        measures = {p.parent.name: _json(p) for p in sorted(d.glob(MEASUREMENTS))}
        scale = d / "noise_scale.json"
        runs.append(
            Run(
                spec["name"],
                spec["group"],
                spec["seed"],
                spec.get("label", spec["name"]),
                summary,
                metrics,
                d,
                measures,
                _json(scale) if scale.exists() else None,
            )
        )
    return sorted(runs, key=lambda r: (r.group, r.name, r.seed))


def run_problem(directory: Path) -> str | None:
    """Why a finished run cannot go into a report (one line naming the file), or ``None``."""
    try:
        load_runs([directory])
    except (ValueError, OSError) as err:
        return str(err)
    return None


def copy_runs(runs: list[Run], out: Path) -> list[Run]:
    """Copy the small files of every run to ``out/runs/<name>/seed<i>`` and re-read them.

    Each copy is atomic; every target lies under ``out/runs`` (:func:`run_directory`).
    """
    targets = []
    for run in runs:
        target = run_directory(out / "runs", run.name, run.seed, run.directory / "run.json")
        if target.resolve() != run.directory.resolve():
            measured = [str(p.relative_to(run.directory)) for p in run.directory.glob(MEASUREMENTS)]
            for name in (*COPIED, *measured):
                source = run.directory / name
                if source.exists():
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(target / name, partial(shutil.copyfile, source))
        targets.append(target)
    return load_runs(targets)


def by_name(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by name, in suite order of first appearance."""
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.name, []).append(run)
    return out


def summary_rows(groups: dict[str, list[Run]]) -> list[dict[str, Any]]:
    """One row per run name: perplexities, epochs, time."""
    rows = []
    for name, runs in groups.items():
        rows.append(
            {
                "name": name,
                "group": runs[0].group,
                "label": runs[0].label,
                "seeds": len(runs),
                "best_val_ppl": stat(runs),
                "test_ppl": stat(runs, "test_ppl"),
                "epochs": stat(runs, "epochs"),
                "train_minutes": Stat([r.summary["train_seconds"] / 60 for r in runs]),
                "seconds_per_step": stat(runs, "seconds_per_step"),
                "limited": limited_seeds(runs),
            }
        )
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``summary.csv``: per run name, mean and sd of every quantity, budget-limited seeds."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = ["best_val_ppl", "test_ppl", "epochs", "train_minutes", "seconds_per_step"]
    header = [f"{k}_{m}" for k in keys for m in ("mean", "sd")]
    writer.writerow(["name", "group", "seeds", *header, "budget_limited_seeds"])
    for row in rows:
        values = [
            f"{row[k].mean:.4f}" if m == "mean" else f"{row[k].sd:.4f}"
            for k in keys
            for m in ("mean", "sd")
        ]
        writer.writerow([row["name"], row["group"], row["seeds"], *values, row["limited"]])
    save_text(buf.getvalue(), path)


FIGURES = {
    "dropout-k": ("fig1_dropout_k.png", "Dropout_k for several k (Fig. 1)"),
    "difference": ("fig2_difference_noise.png", "Dropout_4 + difference noise (Fig. 2)"),
    "explicit": ("fig3_explicit_only.png", "R_approx only against Dropout_k (Fig. 3)"),
    "analytic-noise": ("fig4_analytic_noise.png", "Dropout_k + analytic noise (Fig. 4)"),
    "replacement": ("fig5_analytic_replacement.png", "R_approx + xi_approx (Fig. 5)"),
    "ablations": ("fig6_ablations.png", "Ablations: identity H, R-tilde, l2 (Sec. 5.2)"),
    "grouping": ("fig7_grouping.png", "Mask grouping against per-element"),
    "data-size": ("fig8_data_size.png", "Data size"),
    "estimator": ("fig9_estimators.png", "Gradient estimators of the analytic step"),
    "baselines": (
        "fig10_baselines.png",
        "R-Drop and fraternal dropout against the paper's methods",
    ),
}
# runs drawn in a group's figure besides its own, for reference
REFERENCES = {
    "difference": ["dropout-1", "dropout-4"],
    "explicit": ["dropout-1", "dropout-8", "no-dropout"],
    "analytic-noise": ["dropout-1", "dropout-2", "dropout-4", "dropout-8"],
    "replacement": ["dropout-1", "explicit", "no-dropout"],
    "ablations": ["dropout-1", "explicit"],
    "grouping": ["dropout-1", "explicit", "analytic"],
    "estimator": ["dropout-1", "analytic", "explicit", "analytic-exact"],
    "baselines": ["dropout-1", "analytic", "explicit"],
}


def _curve(
    runs: list[Run], x_key: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max validation perplexity at each evaluation over the seeds that reached it.

    Early stopping ends seeds at different epochs; the curve goes on with the seeds left. Against
    wall time, an evaluation sits at its epoch times the seeds' mean pace (minutes per epoch over
    each whole run), so the curve never runs backwards when a slow seed ends.
    """
    pace = statistics.fmean(r.metrics[-1]["seconds"] / 60 / r.metrics[-1]["epoch"] for r in runs)
    xs, mean, low, high = [], [], [], []
    for i in range(max(len(r.metrics) for r in runs)):
        reached = [r.metrics[i] for r in runs if i < len(r.metrics)]
        vals = [m["val_ppl"] for m in reached]
        epoch = statistics.fmean(m["epoch"] for m in reached)
        xs.append(epoch * pace if x_key == "minutes" else epoch)
        mean.append(statistics.fmean(vals))
        low.append(min(vals))
        high.append(max(vals))
    return xs, mean, low, high


def plot_groups(groups: dict[str, list[Run]], out: Path) -> list[str]:
    """One figure per experiment group: validation perplexity against epoch and wall time."""
    require("matplotlib", "the report's figures").use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for group, (filename, title) in FIGURES.items():
        names = [n for n, rs in groups.items() if rs[0].group == group]
        if not names:  # no run of this group yet: no figure of references alone
            continue
        names += [n for n in REFERENCES.get(group, []) if n in groups and n not in names]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        # matplotlib's default cycle (tab10) repeats after 10 lines: two runs would share a colour
        palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for i, name in enumerate(names):
            runs = groups[name]
            color = palette(i % palette.N)
            for ax, x_key in zip(axes, ("epoch", "minutes"), strict=True):
                xs, mean, low, high = _curve(runs, x_key)
                label = f"{marked(runs)} ({len(runs)})"
                ax.plot(xs, mean, marker=".", color=color, label=label)
                if len(runs) > 1:
                    ax.fill_between(xs, low, high, color=color, alpha=0.15)
        values = [v for n in names for r in groups[n] for v in (m["val_ppl"] for m in r.metrics)]
        bests = [min(m["val_ppl"] for m in r.metrics) for n in names for r in groups[n]]
        # the region where the runs compete: up to 25 % above the worst run's best value
        top = min(max(values), 1.25 * max(bests))
        xlabels = ("epoch", "training wall time (min; the seeds' mean pace)")
        for ax, xlabel in zip(axes, xlabels, strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation perplexity")
            ax.set_ylim(0.98 * min(values), top)
            ax.grid(alpha=0.3)
        legend = f"run (seeds); band: min-max; {LIMITED}: budget-limited"
        axes[0].legend(fontsize=7, title=legend, title_fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        save_figure(fig, out / filename, dpi=110)
        plt.close(fig)
        written.append(filename)
    return written


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """``fig`` as a PNG at ``path``, atomically (no ``Software`` stamp: byte for byte the same)."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi, metadata={"Software": None}))


def _measure_table(runs: list[Run]) -> list[str]:
    measured = [r for r in runs if r.measures]
    if not measured:
        return ["No measurement of a trained Dropout_1 model was found."]
    run = measured[0]
    lines: list[str] = []
    for directory, m in sorted(run.measures.items(), key=lambda kv: kv[0] != "measure"):
        if lines:
            lines.append("")
        lines += _one_measure_table(run, directory, m)
    return lines


def _num(x: float) -> str:
    """Four decimals, or three significant digits below 0.01 (small-q gaps are ~1e-4)."""
    return f"{x:.4f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"


def _one_measure_table(run: Run, directory: str, m: dict[str, Any]) -> list[str]:
    """Gap against the Gauss-Newton prediction per site (and the full second-order term)."""
    full = "full" in m["total"]
    at = "" if m.get("q", "trained") == "trained" else f", every dropping site at q = {m['q']}"
    lines = [
        f"Run `{run.name}/seed{run.seed}` (best weights{at}; `{directory}/`), validation batches; "
        f"gap: Monte-Carlo over masks with the first-order control variate; prediction: lambda R "
        f"with {m['curvature']} curvature, under both groupings (`dropsplit measure`, "
        f"{m['samples']}).",
        "",
        "| site | measured gap | ± s.e. | predicted lambda R (mask) | predicted (element) | "
        "gap / prediction (mask) |"
        + (" full second order | ± s.e. | gap / full |" if full else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if full else ""),
    ]
    rows = [*m["sites"].items(), ("**total**", m["total"])]
    for site, v in rows:
        ratio = v["gap"] / v["mask"] if v["mask"] else float("nan")
        line = (
            f"| {site} | {_num(v['gap'])} | {_num(v['gap_stderr'])} | {_num(v['mask'])} | "
            f"{_num(v['element'])} | {ratio:.2f} |"
        )
        if full:
            full_ratio = v["gap"] / v["full"] if v["full"] else float("nan")
            line += f" {_num(v['full'])} | {_num(v['full_stderr'])} | {full_ratio:.2f} |"
        lines.append(line)
    return lines


def main_fraction(groups: dict[str, list[Run]]) -> str | None:
    """Training fraction of the main runs (Dropout_1's), for the data-size claim."""
    main = groups.get("dropout-1")
    return str(main[0].summary["config"]["data"]["train_fraction"]) if main else None


def _verdict_lines(groups: dict[str, list[Run]]) -> list[str]:
    """The verdict section: the rules, then one row per claim of :data:`CLAIMS`."""
    lines = [
        "## Verdicts",
        "",
        RULES,
        "",
        code_version_text(r for runs in groups.values() for r in runs),
        "",
        "| claim | paper | what the verdict tests | our effect | verdict |",
        "|---|---|---|---|---|",
    ]
    claims = {c.key: c for c in CLAIMS}
    for v in judge_claims(Runs(arms(groups))):
        c = claims[v.claim]
        lines.append(
            f"| ({v.claim}) {c.statement} | {c.paper} | {c.tests} | {v.effect} | **{v.shown}** |"
        )
    for epochs, runs in longer_budgets(arms(groups)):
        judged = [v for v in judge_claims(runs) if v.verdict != NOT_RUN]
        names = ", ".join(f"`{n}`" for n in sorted(runs.arms))
        lines += [
            "",
            f"### At {epochs} epochs",
            "",
            f"The runs trained for {epochs} epochs ({names}), judged by the same rules with "
            f"`{runs.ref.name if runs.ref else '-'}` as Dropout_1; claims without runs at this "
            "budget are left out.",
            "",
            "| claim | our effect | verdict |",
            "|---|---|---|",
            *(
                f"| ({v.claim}) {claims[v.claim].statement} | {v.effect} | **{v.shown}** |"
                for v in judged
            ),
        ]
    return lines


def _not_run_lines(suite: Any, runs: list[Run]) -> list[str]:
    """The suite's runs (seed indices) that have no summary yet (nothing when all ran)."""
    done = {(r.name, r.seed) for r in runs}
    planned: dict[str, list[int]] = {}
    for spec in suite.runs:
        planned.setdefault(spec.name, []).append(spec.seed)
    missing = {n: [i for i in seeds if (n, i) not in done] for n, seeds in planned.items()}
    missing = {n: seeds for n, seeds in missing.items() if seeds}
    if not missing:
        return []
    lines = [
        "",
        "## Not run yet",
        "",
        "The suite runs in the background across sessions; these runs (seed indices) were "
        "not finished when the report was made.",
        "",
        "| run | seeds not run | seeds planned |",
        "|---|---|---:|",
    ]
    for name, seeds in missing.items():
        lines.append(f"| `{name}` | {', '.join(map(str, seeds))} | {len(planned[name])} |")
    return lines


def write_report(
    directories: Iterable[str | Path],
    out: str | Path,
    suite: Any | None = None,
    command: str = "dropsplit report docs/results/paper/runs/*/* --out docs/results/paper",
    step_costs: dict[str, float] | None = None,
) -> Path:
    """Copy the run summaries into ``out`` and write ``REPORT.md``, ``summary.csv``, figures.

    Args:
        directories: Run directories (``OUT/<name>/seed<i>``).
        out: Report directory.
        suite: The :class:`~dropsplit.experiments.reproduce.Suite` (lists runs not yet run;
            optional).
        command: The command printed in the report as the way to regenerate it.
        step_costs: Benchmark step-cost ratios by row name, kept in ``out/step_costs.json``
            (read from there when ``None``) for the practitioner's table.

    Returns:
        Path of ``REPORT.md``.
    """
    from dropsplit.training.runs import writable_directory

    out = writable_directory(Path(out), "the report")
    runs = copy_runs(load_runs(directories), out)
    if not runs:
        raise ValueError("no finished runs to report on")
    groups = by_name(runs)
    rows = summary_rows(groups)
    write_csv(rows, out / "summary.csv")
    figures = plot_groups(groups, out)
    lines = [
        "# Reproducing Wei, Kakade & Ma (2020) at CPU scale",
        "",
        "Generated by `dropsplit report` from the run summaries in `runs/`; do not edit by hand.",
        f"Regenerate (byte for byte): `{command}`",
        "",
    ]
    if suite is not None and suite.description:
        lines += [suite.description.strip(), ""]
    lines += _verdict_lines(groups)
    costs_path = out / "step_costs.json"
    if step_costs is not None:
        save_text(json.dumps(step_costs, indent=2, sort_keys=True) + "\n", costs_path)
    costs = _json(costs_path) if costs_path.exists() else None
    lines += practitioner_lines(groups, costs)
    lines += time_to_quality_lines(
        groups, costs or {}, plot_time_to_quality(groups, costs or {}, out)
    )
    curves = ratio_curves(groups, costs or {})  # the bootstrap once, for the table and figure
    lines += ratio_lines(curves, groups, plot_ratio_curve(curves, groups, out))
    lines += [
        "",
        "## All runs",
        "",
        f"{LIMITED}: budget-limited (a seed's best evaluation in the last 10 % of its epochs or "
        "steps; the last column counts them).",
        "",
        "| group | run | seeds | best val ppl | test ppl at best val | epochs | train min | "
        "s/step | budget-limited seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["group"], r["best_val_ppl"].mean)):
        lines.append(
            f"| {row['group']} | {row['label']}{LIMITED if row['limited'] else ''} | "
            f"{row['seeds']} | "
            f"{row['best_val_ppl'].text()} | {row['test_ppl'].text()} | "
            f"{row['epochs'].mean:.0f} | {row['train_minutes'].mean:.1f} | "
            f"{row['seconds_per_step'].mean:.3f} | {row['limited']} |"
        )
    if suite is not None:
        lines += _not_run_lines(suite, runs)
    lines += ["", "## Figures", ""]
    for filename in figures:
        title = next(t for f, t in FIGURES.values() if f == filename)
        lines += [f"### {title}", "", f"![{title}]({filename})", ""]
    lines += ["## Explicit gap per site of a trained Dropout_1 model", ""]
    lines += _measure_table([r for r in runs if r.name == "dropout-1"])
    lines.append("")
    report = out / "REPORT.md"
    save_text("\n".join(lines), report)
    return report
