"""The findings across configurations: one verdict per (claim, architecture and corpus).

``dropsplit matrix configs/paper/matrix.toml --out docs/results/matrix`` reads the committed
copies of several suite reports (each ``REPORT_DIR/runs/<name>/seed<i>/``), judges every claim of
:data:`~dropsplit.experiments.claims.CLAIMS` on each with the same rules as the single reports,
and writes ``REPORT.md`` (the verdict matrix, a row per claim and a column per configuration; the
seeds each cell rests on and what the missing ones would cost) and one figure per claim with a
panel per configuration. It reads committed files only, so it regenerates byte for byte.

The matrix file lists the columns::

    [[column]]
    report = "docs/results/char-qrnn"              # a `dropsplit report` directory
    suite = "configs/paper/suite-char-qrnn.toml"   # the runs and seeds it plans
"""

from __future__ import annotations

import fnmatch
import re
import statistics
import textwrap
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from dropsplit.experiments.claims import (
    BASE_SEED,
    CLAIMS,
    LIMITED,
    NOT_RUN,
    RULES,
    Arm,
    Claim,
    Runs,
    Verdict,
    arms,
    code_version_text,
    compare,
    dropout_sizes,
    judge_claims,
    stat,
)
from dropsplit.experiments.report import (
    Run,
    by_name,
    limited_seeds,
    load_runs,
    marked,
    save_figure,
)
from dropsplit.experiments.reproduce import Suite, load_suite
from dropsplit.optional import require
from dropsplit.training.checkpoint import save_text
from dropsplit.training.config import load_config, to_dict

MODELS = {"lstm": "LSTM", "qrnn": "QRNN", "transformer": "Transformer"}
HF_ARCHITECTURES = {"gpt2": "GPT-2"}
CORPORA = {"ptb-char": "PTB characters", "wikitext-2-char": "WikiText-2 characters", "ptb": "PTB"}


@dataclass
class Column:
    """One configuration: a suite's report, its runs by name and the suite that plans them."""

    report: Path
    suite: Suite
    groups: dict[str, list[Run]]
    measured: Run | None = None  # the trained Dropout_1 whose explicit gap per site was measured
    # `dropsplit noise-scale` of each seed, by run name: Dropout_1's from the measured run's seeds
    noise_scales: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``Architecture · corpus``, from Dropout_1's config."""
        config = self.groups["dropout-1"][0].summary["config"]
        # summaries from before the model registry have no model.name: they are LSTMs
        # a task without a corpus (digits-mlp) has no data.corpus
        model, corpus = config["model"].get("name", "lstm"), config["data"].get("corpus", "-")
        if model == "digits-mlp":
            return f"MLP ({config['model']['mlp']['activation']}) · digits"
        if model == "hf-causal-lm":
            architecture = config["model"]["hf"]["architecture"]
            model = f"{HF_ARCHITECTURES.get(architecture, architecture)} (transformers)"
        return f"{MODELS.get(model, model)} · {CORPORA.get(corpus, corpus)}"

    @cached_property
    def runs(self) -> Runs:
        """The column's runs, selectable by their saved configs."""
        return Runs(arms(self.groups))

    @cached_property
    def verdicts(self) -> list[Verdict]:
        """One verdict per claim of :data:`CLAIMS`, by the single reports' rules."""
        return judge_claims(self.runs)

    @cached_property
    def plan(self) -> set[str]:
        """The claims the column's suite can judge once every planned run has finished.

        Judged on stand-in values (two seeds, all equal) for every finished run (its saved
        config) and every planned one (its config from the suite): what is left "not run" is
        not in the suite. Cached: the verdict table and the figures both ask.
        """
        configs = {}
        for spec in self.suite.runs:
            if spec.name not in configs:
                configs[spec.name] = to_dict(load_config(self.suite.base, list(spec.overrides)))
        configs |= {name: runs[0].summary["config"] for name, runs in self.groups.items()}
        seeds = {BASE_SEED: 1.0, BASE_SEED + 1: 1.0}
        stand_in = {name: Arm(name, config, seeds) for name, config in configs.items()}
        verdicts = judge_claims(Runs(stand_in))
        return {v.claim for v in verdicts if v.verdict != NOT_RUN}


def load_columns(path: str | Path) -> list[Column]:
    """Read a matrix file (paths relative to the working directory) and the reports it names.

    Raises:
        FileNotFoundError: If the file or a report directory is missing.
        ValueError: If the file lists no column, or a report has no Dropout_1 run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"matrix file {path} does not exist")
    with path.open("rb") as f:
        entries = tomllib.load(f).get("column", [])
    if not entries:
        raise ValueError(f"{path} lists no [[column]]")
    columns = []
    for entry in entries:
        report = Path(entry["report"])
        if not (report / "runs").is_dir():
            raise FileNotFoundError(f"{report} is not a report directory (no runs/)")
        groups = by_name(load_runs(sorted((report / "runs").glob("*/*"))))
        if "dropout-1" not in groups:
            raise ValueError(f"{report} has no finished dropout-1 run to label its column by")
        measured, dropout_1 = groups["dropout-1"][0], groups["dropout-1"]
        if "measured" in entry:  # another run of the same config holds the measurements
            (measured,) = load_runs([entry["measured"]])
            dropout_1 = load_runs(sorted(measured.directory.parent.glob("seed*")))
        scales = {
            name: [r.noise_scale for r in runs if r.noise_scale]
            for name, runs in {**groups, "dropout-1": dropout_1}.items()
        }
        scales = {name: values for name, values in scales.items() if values}
        columns.append(Column(report, load_suite(entry["suite"]), groups, measured, scales))
    return columns


def verdict_matrix(columns: list[Column]) -> list[str]:
    """The verdict table: a row per claim, a column per configuration.

    A claim whose runs the column's suite does not plan is ``-``; one planned but not finished
    is "not run" with the runs it misses.
    """
    lines = [
        "| claim | " + " | ".join(c.label for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for i, claim in enumerate(CLAIMS):
        cells = [c.verdicts[i].cell() if claim.key in c.plan else "-" for c in columns]
        lines.append(f"| ({claim.key}) {claim.statement} | " + " | ".join(cells) + " |")
    return lines


def _natural(name: str) -> list[tuple[int, float, str]]:
    """Sort key: ``dropout-2`` before ``dropout-16``, ``data-0.0025`` before ``data-0.01``.

    Each ``-``-separated part is ``(0, number, "")`` or ``(1, 0, text)``, so a number is never
    compared with a string.
    """
    return [
        (0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
        for t in name.split("-")
    ]


def shown(claim: Claim, names: list[str]) -> list[str]:
    """The runs a claim's figure draws, in the order of its patterns, each once."""
    out: list[str] = []
    for pattern in claim.shows:
        matched = sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=_natural)
        out += [n for n in matched if n not in out]
    return out


def figure_name(claim: Claim) -> str:
    """``claim_<key>.png`` with the key as a file name (``Fig. 4`` -> ``claim_fig4.png``)."""
    return "claim_" + re.sub(r"[^a-z0-9]+", "", claim.key.lower()) + ".png"


def claim_panels(claim: Claim, columns: list[Column]) -> list[tuple[Column, list[str]]]:
    """The panels of a claim's figure: each column whose suite plans it, with the runs drawn.

    The verdict table's "-" columns get no panel: their runs would answer another question.
    """
    return [(c, shown(claim, list(c.groups))) for c in columns if claim.key in c.plan]


def plot_claims(columns: list[Column], out: Path) -> list[str]:
    """One figure per claim with a panel per configuration whose suite plans the claim.

    Every seed's best validation perplexity is a dot, each run's mean ± sd a marker with a bar;
    a budget-limited run's label is marked †; a claim no column ran gets no figure.
    """
    require("matplotlib", "the matrix's figures").use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for claim in CLAIMS:
        panels = claim_panels(claim, columns)
        if not claim.shows or not any(names for _, names in panels):
            continue
        width = max(3.2, 0.45 * max(len(names) for _, names in panels) + 1.5)
        # at least 9 inches: the title is one line of the claim's statement
        size = (max(9.0, width * len(panels)), 4.2)
        fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
        for ax, (column, names) in zip(axes[0], panels, strict=True):
            ax.set_title(column.label, fontsize=9)
            if not names:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                continue
            for x, name in enumerate(names):
                s = stat(column.groups[name])
                ax.plot([x] * s.n, s.values, ".", color="0.55", markersize=5)
                ax.errorbar(x, s.mean, yerr=s.sd, fmt="o", color="C0", capsize=3, markersize=4)
            labels = [f"{marked(column.groups[n])} ({len(column.groups[n])})" for n in names]
            ax.set_xticks(range(len(names)), labels, rotation=60, ha="right", fontsize=7)
            ax.set_xlim(-0.6, len(names) - 0.4)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("best validation perplexity")
        title = textwrap.fill(f"({claim.key}) {claim.statement}", int(11 * size[0]))
        fig.suptitle(
            f"{title}\ndots: seeds; marker and bar: mean ± sd; {LIMITED}: budget-limited run"
        )
        fig.tight_layout()
        name = figure_name(claim)
        save_figure(fig, out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def data_size_table(column: Column) -> list[str]:
    """Dropout_1, 2, 4, 8 at every training size, the paper's WikiText-103 row in its own form.

    Sizes come from the Dropout_k runs of the column's model and corpus at any training fraction
    (their saved configs); the order column ranks the k by mean best validation perplexity (best
    first), and the last column is the largest k against Dropout_1 by the report's test (empty
    with one size). A budget-limited run's cell is marked †, and a size whose ordering rests on
    one says so.
    """
    sizes = dropout_sizes(column.runs)
    if len(sizes) < 2:
        return []
    ks = sorted({k for by_k in sizes.values() for k in by_k})
    lines = [
        f"**{column.label}** (best validation perplexity, mean ± sd (seeds); {LIMITED}: "
        "budget-limited)",
        "",
        "| training fraction | "
        + " | ".join(f"Dropout_{k}" for k in ks)
        + " | order (best first) | largest k - Dropout_1 |",
        "|---:|" + "---:|" * len(ks) + "---|---|",
    ]
    turns = []  # sizes where the largest k is not clearly worse than Dropout_1
    better = []  # ... and where it is clearly better: the paper's WikiText-103 ordering
    limited = []  # sizes with a budget-limited run
    for fraction, by_k in sizes.items():
        runs = {k: column.groups[a.name] for k, a in by_k.items()}
        cells = [marked(runs[k], stat(runs[k]).text()) if k in runs else "-" for k in ks]
        order = " < ".join(str(k) for k in sorted(by_k, key=lambda k: by_k[k].mean))
        if any(limited_seeds(r) for r in runs.values()):
            limited.append(f"{fraction:g}")
        gap = "-"
        if 1 in by_k and max(by_k) > 1:
            c = compare(by_k[1], by_k[max(by_k)])
            gap = f"Dropout_{max(by_k)}: {c.value()}"
            if not c.above:
                turns.append(f"{fraction:g}")
            if c.below:
                better.append(f"{fraction:g}")
        lines.append(f"| {fraction:g} | " + " | ".join(cells) + f" | {order} | {gap} |")
    lines.append("")
    if turns:
        lines.append(
            "The largest k is not clearly worse than Dropout_1 (no 95 % interval above 0; one "
            f"seed has none) at training fraction {', '.join(turns)}; there the implicit effect "
            "is not seen."
        )
    else:
        lines.append("The largest k is clearly worse than Dropout_1 at every size run.")
    if better:
        lines.append(
            f"It is clearly better at training fraction {', '.join(better)}: the order of the "
            "paper's WikiText-103 row (more masks per step help)."
        )
    if limited:
        lines.append(
            f"Runs at training fraction {', '.join(limited)} are budget-limited ({LIMITED}: a "
            "seed's best evaluation in the last 10 % of its epochs): the order there may be one "
            "of speed (which k gets there sooner) rather than of the optimum reached."
        )
    return lines + [""]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def explicit_gap_lines(columns: list[Column]) -> list[str]:
    """Measured gap over the predicted explicit term per site, a row per (column, q)."""
    lines = [
        "| configuration | run (measurement) | q | gap / lambda R_approx per site (gap / full "
        "second-order term) | total |",
        "|---|---|---|---|---|",
    ]
    for c in columns:
        run = c.measured
        if run is None or not run.measures:
            lines.append(f"| {c.label} | not measured | | | |")
            continue
        for directory, m in sorted(run.measures.items(), key=lambda kv: kv[0] != "measure"):
            cells = []
            for site, v in [*m["sites"].items(), ("total", m["total"])]:
                full = f" ({_ratio(v['gap'], v['full'])})" if "full" in v else ""
                cells.append(f"{site} {_ratio(v['gap'], v['mask'])}{full}")
            where = run.directory.as_posix()
            lines.append(
                f"| {c.label} | `{where}/{directory}` | {m.get('q', 'trained')} | "
                + "; ".join(cells[:-1])
                + f" | {cells[-1].removeprefix('total ')} |"
            )
    return lines


def noise_scale_lines(columns: list[Column]) -> list[str]:
    """The section on dropout's noise over the minibatch noise, a row per configuration and run."""
    lines = [
        "## Dropout's noise against the minibatch noise",
        "",
        "Dropout_k keeps the noise plain SGD has (the spread of clean gradients between "
        "minibatches) and removes all but 1/k of dropout's own (the spread over masks on one "
        "minibatch), so the implicit effect can only matter where dropout's noise is not small "
        "beside the minibatch noise. Measured on each seed of the trained Dropout_1 (`dropsplit "
        "noise-scale`: best weights, the first training batches at the training batch size, "
        "several masks each; traces of the covariances); mean ± sd over seeds.",
        "",
        "| configuration | run | seeds | batches x masks | dropout noise trace | minibatch noise "
        "trace | dropout / minibatch | total noise left with Dropout_8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in columns:
        if not c.noise_scales:
            lines.append(f"| {c.label} | not measured | | | | | | |")
        for name, scales in sorted(c.noise_scales.items(), key=lambda kv: _natural(kv[0])):
            cells = []
            for values in (
                [s["dropout"] for s in scales],
                [s["minibatch"] for s in scales],
                [s["ratio"] for s in scales],
                # Dropout_k keeps the minibatch noise and 1/k of dropout's: (r / 8 + 1) / (r + 1)
                [(s["ratio"] / 8 + 1) / (s["ratio"] + 1) for s in scales],
            ):
                spread = f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.3g}{spread}")
            size = f"{scales[0]['batches']} x {scales[0]['samples']}"
            lines.append(
                f"| {c.label} | `{name}` | {len(scales)} | {size} | " + " | ".join(cells) + " |"
            )
    return lines


def _seconds(runs: list[Run]) -> float:
    """Mean training CPU seconds of a run's seeds (wall seconds where CPU time was not kept)."""
    return statistics.fmean(
        r.summary.get("train_cpu_seconds") or r.summary["train_seconds"] for r in runs
    )


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``{"section.key": value}``."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_run_other_budget(column: Column, name: str) -> tuple[list[Run], float] | None:
    """A finished run of the column planned like ``name`` but for its epochs, and their ratio.

    Compares the saved configs with ``name``'s planned one on every key both have but
    ``train.epochs`` and ``train.seed``; the ratio is planned epochs over the run's (an upper
    bound of the cost ratio: early stopping may end the longer run sooner).
    """
    spec = next(s for s in column.suite.runs if s.name == name)
    planned = _flat(to_dict(load_config(column.suite.base, list(spec.overrides))))
    ignored = {"train.epochs", "train.seed"}
    for runs in column.groups.values():
        saved = _flat(runs[0].summary["config"])
        keys = (set(planned) & set(saved)) - ignored  # configs saved by older code lack keys
        if all(planned.get(k) == saved.get(k) for k in keys):
            return runs, float(planned["train.epochs"]) / float(saved["train.epochs"])  # type: ignore[arg-type]
    return None


def missing_cost(columns: list[Column], index: int, name: str) -> float | None:
    """CPU seconds of one more seed of ``name`` in column ``index``.

    From the column's own finished seeds; without one, from a finished run of the column planned
    the same but for its epochs, scaled by the epochs; else from the first other column that has
    the run, scaled by the two columns' Dropout_1 costs (``None``: none of these).
    """
    column = columns[index]
    if name in column.groups:
        return _seconds(column.groups[name])
    found = _same_run_other_budget(column, name)
    if found is not None:
        return _seconds(found[0]) * found[1]
    for other in columns:
        if name in other.groups:
            scale = _seconds(column.groups["dropout-1"]) / _seconds(other.groups["dropout-1"])
            return _seconds(other.groups[name]) * scale
    return None


def coverage_lines(columns: list[Column]) -> list[str]:
    """Per configuration, the planned runs with fewer finished seeds than planned and their cost."""
    lines = [
        "| configuration | run | seeds done / planned | CPU-hours to finish (estimate) |",
        "|---|---|---:|---:|",
    ]
    for index, column in enumerate(columns):
        planned: dict[str, int] = {}
        for spec in column.suite.runs:
            planned[spec.name] = planned.get(spec.name, 0) + 1
        total, unscaled, rows = 0.0, False, []
        for name, n in planned.items():
            done = len(column.groups.get(name, []))
            if done >= n:
                continue
            cost = missing_cost(columns, index, name)
            hours = (
                "no seed anywhere to scale" if cost is None else f"{(n - done) * cost / 3600:.1f}"
            )
            total += 0.0 if cost is None else (n - done) * cost / 3600
            unscaled |= cost is None
            rows.append(f"| {column.label} | `{name}` | {done} / {n} | {hours} |")
        if not rows:
            rows = [f"| {column.label} | every run | all | 0 |"]
        else:
            # a run with no seed to scale from has an unknown cost: the sum is a lower bound
            text = f"at least {total:.1f}" if unscaled else f"{total:.1f}"
            rows.append(f"| {column.label} | **in all** | | **{text}** |")
        lines += rows
    return lines


def mixed_cells(columns: list[Column]) -> list[str]:
    """``"(claim) column: versions"`` for each cell whose verdict compares runs of different code.

    A cell is mixed when a comparison it rests on has seeds trained by different code versions
    (:func:`~dropsplit.experiments.claims.code_of`: numerics versions, else commits).
    """
    cells = []
    for column in columns:
        for verdict in column.verdicts:
            if verdict.code == "mixed":
                cells.append(f"({verdict.claim}) {column.label}: {', '.join(verdict.versions)}")
    return cells


def write_matrix(
    path: str | Path, out: str | Path, command: str, allow_mixed_code: bool = False
) -> Path:
    """Write ``out/REPORT.md`` and the claim figures from the reports ``path`` lists.

    Args:
        path: The matrix TOML file.
        out: Report directory.
        command: The command printed as the way to regenerate the report.
        allow_mixed_code: Write cells that compare runs trained by different code versions
            (marked ‡) instead of refusing.

    Returns:
        Path of ``REPORT.md``.

    Raises:
        ValueError: If a cell compares runs of different code versions and ``allow_mixed_code``
            is false: the cells and their versions, and the two ways on.
    """
    columns = load_columns(path)
    mixed = mixed_cells(columns)
    if mixed and not allow_mixed_code:
        raise ValueError(
            f"{len(mixed)} cell(s) compare runs trained by different code versions: "
            + "; ".join(mixed)
            + ". Retrain those runs with one version, or pass --allow-mixed-code to write them "
            "marked ‡"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_claims(columns, out)
    lines = [*_header_lines(columns, command), *_body_lines(columns)]
    claims = {figure_name(c): c for c in CLAIMS}
    for name in figures:
        title = f"({claims[name].key}) {claims[name].statement}"
        lines += [f"### {title}", "", f"![{claims[name].key}]({name})", ""]
    report = out / "REPORT.md"
    save_text("\n".join(lines), report)  # atomically: a killed run leaves the old report whole
    return report


def _header_lines(columns: list[Column], command: str) -> list[str]:
    """The title, how to regenerate, and one row per configuration."""
    lines = [
        "# The paper's claims across architectures and corpora",
        "",
        "Generated by `dropsplit matrix` from the committed run summaries of the reports below; "
        "do not edit by hand.",
        f"Regenerate (byte for byte): `{command}`",
        "",
        "| configuration | report | suite | runs (seeds) |",
        "|---|---|---|---|",
    ]
    for c in columns:
        seeds = sum(len(r) for r in c.groups.values())
        lines.append(
            f"| {c.label} | `{c.report.as_posix()}` | `{c.suite.path.as_posix()}` | "
            f"{len(c.groups)} ({seeds}) |"
        )
    return lines


def _body_lines(columns: list[Column]) -> list[str]:
    """The verdicts, the data-size rows, the per-site explicit gaps, coverage, figure heading."""
    return [
        "",
        "## Verdicts",
        "",
        f"Each cell is judged by the single reports' rules. {RULES}",
        "",
        code_version_text(r for c in columns for runs in c.groups.values() for r in runs),
        "",
        *verdict_matrix(columns),
        "",
        "What each verdict tests:",
        "",
        *[f"- ({claim.key}) {claim.tests}" for claim in CLAIMS],
        "",
        "## Data size in the paper's form",
        "",
        "The paper's strongest data-size evidence is one row: QRNN on WikiText-103, Dropout_1 / "
        "2 / 4 / 8 = 34.24 / 33.35 / 32.74 / 32.78 (with much data, more masks per step help: the "
        "implicit effect is gone). Here the same row at each training size we ran.",
        "",
        *[line for c in columns for line in data_size_table(c)],
        "## Is R_approx the explicit effect? Per site, per architecture",
        "",
        "Measured on a trained Dropout_1 of each configuration (`dropsplit measure`, best weights, "
        "validation batches): the explicit gap E[loss(dropped)] - loss(clean) per dropout site "
        "(Monte-Carlo over masks) over the Gauss-Newton prediction lambda R_approx (mask "
        "grouping) and, in parentheses, over the whole second-order term with the model's own "
        "curvature (Hutchinson). 1.00 is a perfect prediction; each report's table has the "
        "values with their standard errors.",
        "",
        *explicit_gap_lines(columns),
        "",
        *noise_scale_lines(columns),
        "",
        "## Seeds not run yet",
        "",
        "CPU-hours from the finished seeds of the same run (their training CPU time, one thread "
        "each), or, for a run with no seed yet, from the same run in another configuration "
        "scaled by the two Dropout_1 runs' costs.",
        "",
        *coverage_lines(columns),
        "",
        "## Figures",
        "",
    ]
