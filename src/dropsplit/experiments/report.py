"""The results report: tables, figures and a verdict per paper claim, from run summaries.

``dropsplit report RUN_DIRS... --out DIR`` copies the small files of each run (``run.json``,
``summary.json``, ``metrics.jsonl``, ``measure/measure.json``) to ``DIR/runs/<name>/seed<i>/``
and writes ``DIR/REPORT.md``, ``DIR/summary.csv`` and the figures from those copies only, so
running it again on ``DIR/runs/*/*`` regenerates every file byte for byte.

Verdict rules (stated in the report too): runs are compared by their best validation
perplexity, mean over seeds; a difference is *clear* when it exceeds twice its standard error
(seed standard deviations, at least two seeds per side); with one seed the report says so and
the verdict is at most *inconclusive* unless the difference exceeds 5 %.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COPIED = ("run.json", "summary.json", "metrics.jsonl", "measure/measure.json")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
SINGLE_SEED_MARGIN = 0.05

# the paper's numbers, where it gives them (paper.md section 5); [G]: the official code on Tolstoy
PAPER = {
    "a": "PTB: worse as k grows; Dropout_32 still beats no dropout (~120 best val ppl). "
    "[G]: Dropout_1 83.0, Dropout_4 89.2, Dropout_8 91.6, no reg 118.6",
    "b": "Dropout_4 + xi~ back to Dropout_1 (qualitative)",
    "c": "R_approx beats Dropout_32, trails Dropout_1 (qualitative). [G]: explicit only 87.0 "
    "vs Dropout_1 83.0, Dropout_8 91.6",
    "d": "R_approx + xi_approx matches dropout (qualitative). [G]: 77.4 vs Dropout_1 83.0",
    "e": "PTB (slides): identity H 108.76, l2 112.04, R-tilde 84.06, R_approx 84.52",
    "f": "WT103: Dropout_1 34.24, Dropout_2 33.35, Dropout_4 32.74, Dropout_8 32.78 "
    "(no implicit effect with much data)",
    "Fig. 4": "tracks Dropout_1 (qualitative). [G]: Dropout_8 + implicit 83.1 vs Dropout_1 83.0",
    "grouping": "the original code squares per element",
    "estimator": "-",
}
CLAIMS = {
    "a": "Best validation perplexity gets worse monotonically with k (Dropout_k, k = 1, 2, 4, 8).",
    "b": "Dropout_4 + sqrt(3/4) two-sample difference noise is within noise of Dropout_1.",
    "c": "Clean loss + R_approx (explicit only) beats the largest-k Dropout_k but trails "
    "Dropout_1.",
    "d": "R_approx + xi_approx (the analytic replacement) comes close to Dropout_1.",
    "e": "Identity H_out, tuned, is about as good as the best l2 and worse than R_approx.",
    "f": "With more data the Dropout_k - Dropout_1 gap shrinks.",
    "Fig. 4": "Dropout_k + sqrt(1 - 1/k) xi_approx tracks Dropout_1.",
    "grouping": "(ours) Per-element squares (the original code) against the mask grouping rule.",
    "estimator": "(ours) Gradient estimators of the analytic step: HVP differences (the main "
    "runs) against exact double backward (`-exact`) and finite differences (`-fd`).",
}


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
    measure: dict[str, Any] | None = None


@dataclass
class Stat:
    """Mean and spread of a quantity over the seeds of a run."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean over seeds."""
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        """Sample standard deviation (0 with one seed)."""
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def text(self, digits: int = 2) -> str:
        """``mean ± sd (n)``."""
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} ({self.n})"


def load_runs(directories: Iterable[str | Path]) -> list[Run]:
    """Read run directories written by ``dropsplit reproduce`` (skips unfinished ones).

    Raises:
        FileNotFoundError: If a directory has no ``run.json``.
    """
    runs = []
    for d in directories:
        d = Path(d)
        spec_path = d / "run.json"
        if not spec_path.exists():
            raise FileNotFoundError(f"{d} is not a suite run (no run.json)")
        if not (d / "summary.json").exists():
            continue
        spec = json.loads(spec_path.read_text())
        metrics_path = d / "metrics.jsonl"
        metrics = [
            json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()
        ]
        measure_path = d / "measure" / "measure.json"
        runs.append(
            Run(
                spec["name"],
                spec["group"],
                spec["seed"],
                spec.get("label", spec["name"]),
                json.loads((d / "summary.json").read_text()),
                metrics,
                d,
                json.loads(measure_path.read_text()) if measure_path.exists() else None,
            )
        )
    return sorted(runs, key=lambda r: (r.group, r.name, r.seed))


def copy_runs(runs: list[Run], out: Path) -> list[Run]:
    """Copy the small files of every run to ``out/runs/<name>/seed<i>`` and re-read them."""
    targets = []
    for run in runs:
        target = out / "runs" / run.name / f"seed{run.seed}"
        if target.resolve() != run.directory.resolve():
            for name in COPIED:
                source = run.directory / name
                if source.exists():
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target / name)
        targets.append(target)
    return load_runs(targets)


def by_name(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by name, in suite order of first appearance."""
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.name, []).append(run)
    return out


def stat(runs: list[Run], key: str = "best_val_ppl") -> Stat:
    """Mean and spread of a summary field over seeds."""
    return Stat([float(r.summary[key]) for r in runs])


@dataclass
class Comparison:
    """``b - a`` of best validation perplexity with its standard error."""

    a: Stat
    b: Stat

    @property
    def diff(self) -> float:
        """Difference of the means."""
        return self.b.mean - self.a.mean

    @property
    def se(self) -> float | None:
        """Standard error of the difference (``None`` with fewer than two seeds a side)."""
        if self.a.n < 2 or self.b.n < 2:
            return None
        return math.sqrt(self.a.sd**2 / self.a.n + self.b.sd**2 / self.b.n)

    def clear(self) -> bool:
        """Whether ``|diff|`` exceeds 2 s.e. (or 5 % of ``a`` with one seed)."""
        if self.se is None:
            return abs(self.diff) > SINGLE_SEED_MARGIN * self.a.mean
        return abs(self.diff) > 2 * self.se

    def text(self) -> str:
        """``+d ± 2se`` or ``+d (1 seed)``."""
        if self.se is None:
            return f"{self.diff:+.2f} (1 seed)"
        return f"{self.diff:+.2f} ± {2 * self.se:.2f}"


@dataclass
class Verdict:
    """A claim's verdict, effect and the runs it rests on."""

    claim: str
    verdict: str
    effect: str


def _missing(needed: list[str], stats: dict[str, Stat], claim: str) -> Verdict | None:
    absent = [n for n in needed if n not in stats]
    if absent:
        return Verdict(claim, "not run", f"missing runs: {', '.join(absent)}")
    return None


def _dropout_k_names(stats: dict[str, Stat], prefix: str = "dropout-") -> list[str]:
    names = [n for n in stats if n.startswith(prefix) and n[len(prefix) :].isdigit()]
    return sorted(names, key=lambda n: int(n[len(prefix) :]))


def _recovers(gap: float, left: float) -> str:
    """``recovers P % of the gap``: the share of a positive ``gap`` to Dropout_1 that is closed."""
    return f"recovers {100 * (1 - left / gap):.0f} % of the gap"


def _largest_k(stats: dict[str, Stat], ks: list[str]) -> str:
    """The largest k with two or more seeds (a comparison with a standard error), else the largest.

    A one-seed Dropout_8 added to a three-seed suite must not turn its verdicts into one-seed ones.
    """
    seeded = [n for n in ks[1:] if stats[n].n > 1]
    return seeded[-1] if seeded else ks[-1]


def verdicts(stats: dict[str, Stat], main_fraction: str | None = None) -> list[Verdict]:
    """One verdict per paper claim (a)-(f) from the mean best validation perplexities.

    Args:
        stats: Best validation perplexity per run name.
        main_fraction: Training fraction of the main runs (for the data-size claim).
    """
    out = []
    ks = _dropout_k_names(stats)
    # (a) monotone worsening with k
    if len(ks) < 2 or ks[0] != "dropout-1":
        out.append(Verdict("a", "not run", "needs dropout-1 and a larger k"))
    else:
        steps = [Comparison(stats[a], stats[b]) for a, b in zip(ks, ks[1:], strict=False)]
        end = _largest_k(stats, ks)
        total = Comparison(stats[ks[0]], stats[end])
        means = ", ".join(f"k={n.split('-')[1]}: {stats[n].mean:.2f} ({stats[n].n})" for n in ks)
        effect = f"{means}; Dropout_{end.split('-')[1]} - Dropout_1 = {total.text()}"
        no_reversal = all(s.diff > 0 or not s.clear() for s in steps)
        if total.diff > 0 and total.clear() and no_reversal:
            v = REPRODUCED if total.se is not None else INCONCLUSIVE
        elif total.clear() and total.diff < 0:
            v = NOT_REPRODUCED
        else:
            v = INCONCLUSIVE if total.se is None else NOT_REPRODUCED
        out.append(Verdict("a", v, effect))
    # (b) difference noise brings Dropout_4 back to Dropout_1
    miss = _missing(["dropout-1", "dropout-4", "dropout-4-difference"], stats, "b")
    if miss:
        out.append(miss)
    else:
        back = Comparison(stats["dropout-1"], stats["dropout-4-difference"])
        gap = Comparison(stats["dropout-1"], stats["dropout-4"])
        effect = (
            f"(Dropout_4 + difference) - Dropout_1 = {back.text()}; "
            f"Dropout_4 - Dropout_1 = {gap.text()}"
        )
        if gap.diff > 0:
            effect += f"; the noise {_recovers(gap.diff, back.diff)}"
        if not gap.clear():
            v = INCONCLUSIVE  # nothing to recover at this scale
        elif back.clear() and back.diff > 0:
            v = NOT_REPRODUCED
        else:
            v = REPRODUCED if back.se is not None else INCONCLUSIVE
        out.append(Verdict("b", v, effect))
    # (c) explicit only between Dropout_1 and the largest k
    largest = _largest_k(stats, ks) if len(ks) > 1 else "dropout-8"
    miss = _missing(["dropout-1", largest, "explicit"], stats, "c")
    if miss:
        out.append(miss)
    else:
        vs_one = Comparison(stats["dropout-1"], stats["explicit"])
        vs_k = Comparison(stats[largest], stats["explicit"])
        k = largest.split("-")[1]
        effect = f"explicit - Dropout_1 = {vs_one.text()}; explicit - Dropout_{k} = {vs_k.text()}"
        beats_k = vs_k.diff < 0 and vs_k.clear()
        trails_one = vs_one.diff > 0 and vs_one.clear()
        if beats_k and trails_one:
            v = REPRODUCED if vs_one.se is not None else INCONCLUSIVE
        elif (vs_k.diff > 0 and vs_k.clear()) or (vs_one.diff < 0 and vs_one.clear()):
            v = NOT_REPRODUCED
        else:
            v = INCONCLUSIVE
        out.append(Verdict("c", v, effect))
    # (d) the analytic replacement close to Dropout_1
    miss = _missing(["dropout-1", "analytic"], stats, "d")
    if miss:
        out.append(miss)
    else:
        c = Comparison(stats["dropout-1"], stats["analytic"])
        rel = c.diff / stats["dropout-1"].mean
        effect = f"analytic - Dropout_1 = {c.text()} ({100 * rel:+.1f} %)"
        close = abs(rel) <= 0.02 or not c.clear()
        if close or c.diff < 0:
            v = REPRODUCED if c.se is not None else INCONCLUSIVE
        else:
            v = NOT_REPRODUCED
        out.append(Verdict("d", v, effect))
    # (e) identity H tuned ~ l2 tuned, worse than R_approx
    identity = _best(stats, "identity-")
    l2 = _best(stats, "l2-")
    if identity is None or l2 is None or "explicit" not in stats:
        out.append(Verdict("e", "not run", "needs identity-*, l2-* and explicit runs"))
    else:
        vs_l2 = Comparison(stats[l2], stats[identity])
        vs_r = Comparison(stats["explicit"], stats[identity])
        effect = (
            f"best identity ({identity}) {stats[identity].mean:.2f}, best l2 ({l2}) "
            f"{stats[l2].mean:.2f}, R_approx {stats['explicit'].mean:.2f}; identity - l2 = "
            f"{vs_l2.text()}; identity - R_approx = {vs_r.text()}"
        )
        like_l2 = abs(vs_l2.diff) <= 0.05 * stats[l2].mean
        worse_than_r = vs_r.diff > 0 and vs_r.clear()
        if like_l2 and worse_than_r:
            v = REPRODUCED
        elif vs_r.diff < 0 and vs_r.clear():
            v = NOT_REPRODUCED
        else:
            v = INCONCLUSIVE
        out.append(Verdict("e", v, effect))
    # (f) the k gap shrinks with more data
    fractions = _fraction_gaps(stats, main_fraction)
    if len(fractions) < 2:
        out.append(Verdict("f", "not run", "needs dropout-1 and dropout-k at two data sizes"))
    else:
        gaps = [(f, c) for f, c in fractions]
        effect = "; ".join(f"fraction {f}: Dropout_k - Dropout_1 = {c.text()}" for f, c in gaps)
        rel = [c.diff / c.a.mean for _, c in gaps]
        shrinking = all(b < a for a, b in zip(rel, rel[1:], strict=False))
        if shrinking and gaps[0][1].clear():
            v = REPRODUCED if gaps[0][1].se is not None else INCONCLUSIVE
        elif not shrinking and all(c.clear() for _, c in gaps):
            v = NOT_REPRODUCED
        else:
            v = INCONCLUSIVE
        out.append(Verdict("f", v, effect))
    out.append(_tracks_dropout_1(stats))
    # a verdict resting on a one-seed comparison is at most inconclusive
    for v in out:
        if "(1 seed)" in v.effect and v.verdict in (REPRODUCED, NOT_REPRODUCED):
            v.verdict = f"{INCONCLUSIVE} (1 seed; leans {v.verdict})"
    out.append(
        _finding(
            stats, "grouping", [("explicit", "explicit-element"), ("analytic", "analytic-element")]
        )
    )
    estimators = [
        ("analytic-exact", "analytic"),
        ("analytic-exact", "analytic-fd"),
        ("analytic", "analytic-fd"),
        ("explicit", "explicit-fd"),
    ]
    out.append(_finding(stats, "estimator", estimators))
    return out


def _tracks_dropout_1(stats: dict[str, Stat]) -> Verdict:
    """Fig. 4: every Dropout_k + analytic noise run close to Dropout_1."""
    names = _dropout_k_names(
        {n.removesuffix("-analytic"): s for n, s in stats.items() if n.endswith("-analytic")}
    )
    if "dropout-1" not in stats or not names:
        return Verdict("Fig. 4", "not run", "needs dropout-1 and dropout-<k>-analytic runs")
    parts, verdict = [], REPRODUCED
    for name in names:
        c = Comparison(stats["dropout-1"], stats[f"{name}-analytic"])
        part = f"{name} + analytic noise - Dropout_1 = {c.text()}"
        if name in stats:  # how much of Dropout_k's own gap the noise closes, as in (b)
            gap = stats[name].mean - stats["dropout-1"].mean
            part += f" ({_recovers(gap, c.diff)})" if gap > 0 else ""
        parts.append(part)
        if c.clear() and c.diff > 0:
            verdict = NOT_REPRODUCED
        elif c.se is None and verdict == REPRODUCED:
            verdict = INCONCLUSIVE
    return Verdict("Fig. 4", verdict, "; ".join(parts))


def _finding(stats: dict[str, Stat], claim: str, pairs: list[tuple[str, str]]) -> Verdict:
    """A comparison of ours with no paper verdict: the effect only."""
    parts = [
        f"{b} - {a} = {Comparison(stats[a], stats[b]).text()}"
        for a, b in pairs
        if a in stats and b in stats
    ]
    if not parts:
        absent = sorted({n for pair in pairs for n in pair if n not in stats})
        return Verdict(claim, "not run", "missing runs: " + ", ".join(absent))
    return Verdict(claim, "finding", "; ".join(parts))


def _best(stats: dict[str, Stat], prefix: str) -> str | None:
    names = [n for n in stats if n.startswith(prefix)]
    return min(names, key=lambda n: stats[n].mean) if names else None


def _fraction_gaps(
    stats: dict[str, Stat], main_fraction: str | None
) -> list[tuple[str, Comparison]]:
    """``[(fraction, Dropout_k vs Dropout_1)]`` by training fraction.

    From runs named ``data-<fraction>-dropout-<k>``, plus the main suite's ``dropout-1`` and
    ``dropout-<k>`` (same ``k``) at the main fraction.
    """
    pairs: dict[str, dict[str, Stat]] = {}
    for name, s in stats.items():
        if name.startswith("data-"):
            _, fraction, rest = name.split("-", 2)
            pairs.setdefault(fraction, {})[rest] = s
    if main_fraction is not None and pairs and main_fraction not in pairs:
        k_names = {n for p in pairs.values() for n in p}
        pairs[main_fraction] = {n: stats[n] for n in k_names if n in stats}
    out = []
    for fraction in sorted(pairs, key=float):
        ks = _dropout_k_names(pairs[fraction])
        if len(ks) >= 2 and ks[0] == "dropout-1":
            out.append((fraction, Comparison(pairs[fraction][ks[0]], pairs[fraction][ks[-1]])))
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
            }
        )
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``summary.csv``: per run name, mean and sd of every quantity."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = ["best_val_ppl", "test_ppl", "epochs", "train_minutes", "seconds_per_step"]
    writer.writerow(["name", "group", "seeds"] + [f"{k}_{m}" for k in keys for m in ("mean", "sd")])
    for row in rows:
        values = [
            f"{row[k].mean:.4f}" if m == "mean" else f"{row[k].sd:.4f}"
            for k in keys
            for m in ("mean", "sd")
        ]
        writer.writerow([row["name"], row["group"], row["seeds"], *values])
    path.write_text(buf.getvalue())


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
    import matplotlib

    matplotlib.use("Agg")
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
                label = f"{runs[0].label} ({len(runs)})"
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
        axes[0].legend(fontsize=7, title="run (seeds); band: min-max", title_fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(filename)
    return written


def _measure_table(runs: list[Run]) -> list[str]:
    measured = [r for r in runs if r.measure is not None]
    if not measured:
        return ["No measurement of a trained Dropout_1 model was found."]
    run = measured[0]
    m = run.measure
    lines = [
        f"Run `{run.name}/seed{run.seed}` (best weights), validation batches; gap: Monte-Carlo "
        f"over masks with the first-order control variate; prediction: lambda R with "
        f"{m['curvature']} curvature, under both groupings (`dropsplit measure`, {m['samples']}).",
        "",
        "| site | measured gap | ± s.e. | predicted lambda R (mask) | predicted (element) | "
        "gap / prediction (mask) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [*m["sites"].items(), ("**total**", m["total"])]
    for site, v in rows:
        ratio = v["gap"] / v["mask"] if v["mask"] else float("nan")
        lines.append(
            f"| {site} | {v['gap']:.4f} | {v['gap_stderr']:.4f} | {v['mask']:.4f} | "
            f"{v['element']:.4f} | {ratio:.2f} |"
        )
    return lines


def write_report(
    directories: Iterable[str | Path],
    out: str | Path,
    suite: Any | None = None,
    command: str = "dropsplit report docs/results/paper/runs/*/* --out docs/results/paper",
) -> Path:
    """Copy the run summaries into ``out`` and write ``REPORT.md``, ``summary.csv``, figures.

    Args:
        directories: Run directories (``OUT/<name>/seed<i>``).
        out: Report directory.
        suite: The :class:`~dropsplit.experiments.reproduce.Suite` (lists runs not yet run;
            optional).
        command: The command printed in the report as the way to regenerate it.

    Returns:
        Path of ``REPORT.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = copy_runs(load_runs(directories), out)
    if not runs:
        raise ValueError("no finished runs to report on")
    groups = by_name(runs)
    rows = summary_rows(groups)
    stats = {row["name"]: row["best_val_ppl"] for row in rows}
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
    lines += [
        "## Verdicts",
        "",
        "Best validation perplexity, mean over seeds. A difference is *clear* when it exceeds "
        "twice its standard error (seed standard deviations, two or more seeds a side); with one "
        "seed a difference counts only beyond 5 %, and a verdict resting on one seed is at most "
        "*inconclusive*. Effects are written `difference ± 2 s.e.`",
        "",
        "| claim | paper | our effect | verdict |",
        "|---|---|---|---|",
    ]
    main = groups.get("dropout-1")
    main_fraction = str(main[0].summary["config"]["data"]["train_fraction"]) if main else None
    for v in verdicts(stats, main_fraction):
        lines.append(
            f"| ({v.claim}) {CLAIMS[v.claim]} | {PAPER[v.claim]} | {v.effect} | **{v.verdict}** |"
        )
    lines += [
        "",
        "## All runs",
        "",
        "| group | run | seeds | best val ppl | test ppl at best val | epochs | train min | "
        "s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["group"], r["best_val_ppl"].mean)):
        lines.append(
            f"| {row['group']} | {row['label']} | {row['seeds']} | "
            f"{row['best_val_ppl'].text()} | {row['test_ppl'].text()} | "
            f"{row['epochs'].mean:.0f} | {row['train_minutes'].mean:.1f} | "
            f"{row['seconds_per_step'].mean:.3f} |"
        )
    if suite is not None:
        done = {(r.name, r.seed) for r in runs}
        planned: dict[str, list[int]] = {}
        for spec in suite.runs:
            planned.setdefault(spec.name, []).append(spec.seed)
        missing = {n: [i for i in seeds if (n, i) not in done] for n, seeds in planned.items()}
        missing = {n: seeds for n, seeds in missing.items() if seeds}
        if missing:
            lines += [
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
    lines += ["", "## Figures", ""]
    for filename in figures:
        title = next(t for f, t in FIGURES.values() if f == filename)
        lines += [f"### {title}", "", f"![{title}]({filename})", ""]
    lines += ["## Explicit gap per site of a trained Dropout_1 model", ""]
    lines += _measure_table([r for r in runs if r.name == "dropout-1"])
    lines.append("")
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    return report
