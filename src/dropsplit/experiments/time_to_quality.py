"""Time to quality: how soon each run first reaches Dropout_1's best validation perplexity.

A user buys a regularizer by how soon it gives a model at least as good as dropout's, not by its
step cost. For each run: the first evaluation at or below Dropout_1's best validation perplexity
(mean over Dropout_1's seeds), in steps, in *dropout-step equivalents* (the sum of the
benchmarked step-cost ratios of the steps taken: a lazy or scheduled run mixes clean, partial and
full analytic steps) and in wall time, the latter only from clean timings (:func:`clean_timing`).
Dropout_1's own time to that quality is each seed's time to its own best evaluation. The verdict
lines give each analytic run's ratio to it with the spread over seeds.

The ratio over targets (:func:`ratio_curve`, issue 29 item 4): for targets from Dropout_1's mean
best to 5 % above it, the ratio of the mean cost to reach the target to Dropout_1's mean cost,
with a percentile interval from a bootstrap over seeds on both sides, so Dropout_1's own spread
enters it; each variant's interval is also given at a Bonferroni level for the choice among the
variants reported.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dropsplit.experiments.claims import (
    LIMITED,
    Stat,
    arm,
    budget_limited,
    compare,
    same_setting,
    stat,
)
from dropsplit.experiments.practice import first_reaching
from dropsplit.optional import require
from dropsplit.training.checkpoint import atomic_write
from dropsplit.training.config import RESUMABLE

MIN_CPU_SHARE = 0.95  # CPU time / wall time of a one-thread run that had its core to itself
FIGURE = "fig11_time_to_quality.png"
RATIO_FIGURE = "fig12_time_to_quality_ratio.png"
TARGETS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05)  # above Dropout_1's mean best, relative
RESAMPLES = 10_000  # bootstrap resamples per side
LEVEL = 0.95
# kind of step -> benchmark row of its cost (`dropsplit bench --size char`, ratios to DropoutK(1))
STEP_ROWS = {
    "clean": "NoDropout",
    "both": "Analytic(sampled, implicit) HVP",
    "explicit": "Analytic(sampled) HVP",
    "implicit": "Analytic(implicit only) HVP",
}


def _marked(runs: list[Any]) -> str:
    """A run's label, with † when a seed is budget-limited."""
    limited = any(budget_limited(r.summary, r.metrics) for r in runs)
    return runs[0].label + (LIMITED if limited else "")


def _curvature(method: dict[str, Any]) -> str | None:
    # runs saved before the key was renamed call it "explicit"
    return method.get("curvature", method.get("explicit"))


def step_kind(method: dict[str, Any], step: int) -> str:
    """Which terms an analytic run's step ``step`` (0-based) takes.

    The lazy intervals and the schedule's start as :class:`~dropsplit.methods.Analytic` applies
    them: ``"clean"``, ``"both"``, ``"explicit"`` or ``"implicit"``.
    """
    since = step - method.get("start_step", 0)
    explicit = _curvature(method) is not None and since % method.get("explicit_every", 1) == 0
    implicit = method.get("implicit", True) and since % method.get("implicit_every", 1) == 0
    if since < 0 or not (explicit or implicit):
        return "clean"
    return "both" if explicit and implicit else "explicit" if explicit else "implicit"


def step_counts(method: dict[str, Any], steps: int) -> dict[str, int]:
    """How many of the first ``steps`` steps are of each :func:`step_kind`, counted directly.

    Of the ``R`` steps from the start on, ``ceil(R / m)`` take the explicit term, ``ceil(R /
    m')`` the implicit one and ``ceil(R / lcm(m, m'))`` both (a report costs every evaluation of
    every run, so no loop over the steps).
    """
    regularized = max(0, steps - method.get("start_step", 0))
    m, m_noise = method.get("explicit_every", 1), method.get("implicit_every", 1)
    explicit = -(-regularized // m) if _curvature(method) is not None else 0
    implicit = -(-regularized // m_noise) if method.get("implicit", True) else 0
    both = -(-regularized // math.lcm(m, m_noise)) if explicit and implicit else 0
    return {
        "clean": steps - explicit - implicit + both,
        "both": both,
        "explicit": explicit - both,
        "implicit": implicit - both,
    }


def cpu_share(summary: dict[str, Any]) -> float | None:
    """The steps' CPU time over their wall time (``None``: not recorded)."""
    cpu, wall = summary.get("train_cpu_seconds"), summary.get("train_seconds")
    return None if cpu is None or not wall else cpu / wall


def dropout_step_equivalents(
    config: dict[str, Any], steps: int, costs: dict[str, float]
) -> float | None:
    """Cost of a run's first ``steps`` steps in Dropout_1 steps (``None``: no benchmark row).

    Dropout_k costs its ``"DropoutK(k) loop"`` row (1 for k = 1), no dropout ``"NoDropout"``, an
    HVP-difference analytic run the sum of its steps' rows (:data:`STEP_ROWS`).
    """
    method = config["method"]
    name = method["name"]
    if name == "dropout" and method.get("noise", "none") == "none":
        row = "DropoutK(1)" if method["k"] == 1 else f"DropoutK({method['k']}) loop"
        return steps * costs[row] if row in costs else None
    if name == "none":
        return steps * costs["NoDropout"] if "NoDropout" in costs else None
    if name != "analytic" or method.get("gradient") != "hvp-difference":
        return None
    if _curvature(method) not in ("sampled", None):
        return None
    counts = step_counts(method, steps)
    if any(n and STEP_ROWS[kind] not in costs for kind, n in counts.items()):
        return None
    return sum(n * costs[STEP_ROWS[kind]] for kind, n in counts.items() if n)


def clean_timing(summary: dict[str, Any]) -> bool:
    """Whether a run's wall times measure its own work.

    On a CPU: one thread, and its steps' CPU time at least :data:`MIN_CPU_SHARE` of their wall
    time (a shared or paused core lowers the share). On a GPU the share says nothing (the CPU
    waits on the device): a CUDA run counts as clean, which holds when runs are trained one at
    a time as ``bench/gpu_check.sh`` does.
    """
    if summary.get("device") == "cuda":
        return True
    share = cpu_share(summary)
    return share is not None and summary.get("threads") == 1 and share >= MIN_CPU_SHARE


def own_best(run: Any) -> dict[str, Any]:
    """Step and seconds of a run's best evaluation (the first, on ties)."""
    best = min(run.metrics, key=lambda m: m["val_ppl"])
    return {"step": best["step"], "seconds": best["seconds"]}


def _headline(runs: list[Any], name: str) -> bool:
    method = runs[0].summary["config"]["method"]
    return name == "dropout-1" or (
        method["name"] == "analytic"
        and method.get("gradient") == "hvp-difference"
        and _curvature(method) == "sampled"
    )


def _ratios(runs, reference, costs, key) -> Stat | None:
    """Per seed: its cost to reach the target over Dropout_1's mean cost to its own best.

    ``key``: ``"seconds"`` or ``"equivalents"``. ``None`` if a seed never reaches the target or
    a cost is unknown.
    """
    target = stat(reference).mean
    hits = [first_reaching(run, target) for run in runs]
    if any(hit is None for hit in hits):
        return None
    values = [_cost(run, hit, costs, key) for run, hit in zip(runs, hits, strict=True)]
    base = [_cost(r, own_best(r), costs, key) for r in reference]
    known = [v for v in values if v is not None]
    known_base = [b for b in base if b is not None]
    if len(known) < len(values) or len(known_base) < len(base):
        return None
    return Stat([v / statistics.fmean(known_base) for v in known])


def _cost(run, evaluation, costs, key) -> float | None:
    if key == "seconds":
        return evaluation["seconds"] if clean_timing(run.summary) else None
    return dropout_step_equivalents(run.summary["config"], evaluation["step"], costs)


def _cells(runs: list[Any], target: float, costs: dict[str, float]) -> list[str]:
    shares = [x for x in map(cpu_share, (r.summary for r in runs)) if x is not None]
    share = f"{min(shares):.2f}" if shares else "-"
    reached = [(r, first_reaching(r, target)) for r in runs]
    hits = [(r, h) for r, h in reached if h is not None]
    if not hits:
        return ["never", "never", "never", share]
    suffix = "" if len(hits) == len(runs) else f" ({len(hits)} of {len(runs)} seeds)"
    steps = statistics.fmean(h["step"] for _, h in hits)
    costed = [dropout_step_equivalents(r.summary["config"], int(h["step"]), costs) for r, h in hits]
    equivalents = [c for c in costed if c is not None]
    eq_text = "-"
    if len(equivalents) == len(costed):
        eq_text = f"{statistics.fmean(equivalents):.0f}{suffix}"
    clean = [h["seconds"] / 60 for r, h in hits if clean_timing(r.summary)]
    wall = f"{statistics.fmean(clean):.1f}" if clean else "not clean"
    if clean and len(clean) < len(hits):
        wall += f" ({len(clean)} of {len(hits)} clean)"
    return [f"{steps:.0f}{suffix}", eq_text, wall, share]


def time_to_quality_lines(
    groups: dict[str, list[Any]], costs: dict[str, float], figure: str | None = None
) -> list[str]:
    """The report's time-to-quality section (empty without Dropout_1 or an analytic run).

    Args:
        groups: Runs by name.
        costs: Benchmark step-cost ratios by row name.
        figure: File name of :func:`plot_time_to_quality`'s figure, shown when given.
    """
    groups = comparable(groups)
    if "dropout-1" not in groups or not any(
        _headline(rs, n) for n, rs in groups.items() if n != "dropout-1"
    ):
        return []
    reference = groups["dropout-1"]
    target = stat(reference).mean
    timed = [r.summary for rs in groups.values() for r in rs if clean_timing(r.summary)]
    machines = sorted({s.get("machine", "?") for s in timed})
    lines = [
        "",
        "## Time to quality",
        "",
        f"When each run first reaches Dropout_1's best validation perplexity ({target:.2f}, mean "
        "over its seeds); mean over the seeds that reach it. *Dropout-step equivalents*: the "
        "steps taken, each weighted by its benchmarked cost in Dropout_1 steps (a lazy or "
        "scheduled run sums clean, partial and full analytic steps). *Wall min*: training time "
        "up to that evaluation, only from clean timings: one thread and the steps' CPU time at "
        f"least {MIN_CPU_SHARE:.0%} of their wall time (*min CPU share*, lowest over seeds). "
        f"{LIMITED}: budget-limited (a seed's best evaluation in the last 10 % of its budget). "
        f"Clean timings: {len(timed)} runs, on {', '.join(machines) if machines else '-'}.",
        "",
        "| run | best val ppl | reaches at step | dropout-step equivalents | wall min | "
        "min CPU share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for runs in sorted(groups.values(), key=lambda rs: stat(rs).mean):
        cells = " | ".join(_cells(runs, target, costs))
        lines.append(f"| {_marked(runs)} | {stat(runs).text()} | {cells} |")
    lines += ["", *_verdicts(groups, reference, costs)]
    if figure:
        lines += ["", f"![Time to quality]({figure})"]
    return lines


def _verdicts(groups, reference, costs) -> list[str]:
    base = [own_best(r) for r in reference]
    lines = [
        f"Dropout_1 reaches its own best at step {statistics.fmean(b['step'] for b in base):.0f} "
        "(mean over seeds): its time to quality is each seed's time to its best evaluation, and "
        "each ratio below is a seed's cost to reach Dropout_1's best over the mean of those.",
        "",
    ]
    for name, runs in groups.items():
        if name == "dropout-1" or not _headline(runs, name):
            continue
        wall = _ratios(runs, reference, costs, "seconds")
        steps = _ratios(runs, reference, costs, "equivalents")
        final = compare(arm("dropout-1", reference), arm(name, runs))
        better = "clearly better" if final.below else "not clearly better"
        quality = f"final best validation {final.value()} against Dropout_1: {better}"
        if final.limited:
            quality += f" ({LIMITED} rests on budget-limited runs: {', '.join(final.limited)})"
        if not all(first_reaching(r, stat(reference).mean) for r in runs):
            lines.append(f"- {_marked(runs)}: a seed never reaches Dropout_1's quality; {quality}.")
            continue
        step_text = (
            "(no step-cost benchmark for its dropout-step equivalents)"
            if steps is None
            else f"in **{steps.text()}** x Dropout_1's dropout-step equivalents"
        )
        wall_text = "no clean timing of every seed"
        if wall is not None:
            wall_text = f"**{wall.text()}** x Dropout_1's"
        lines.append(
            f"- {_marked(runs)} reaches Dropout_1's quality {step_text}; in wall time: "
            f"{wall_text}; {quality}."
        )
    return lines


def reference_cost(run: Any, target: float, costs: dict[str, float]) -> float | None:
    """A Dropout_1 seed's cost to ``target`` in dropout-step equivalents.

    Its first evaluation at or below the target, or its own best where that lies above the
    target (the convention of :func:`_verdicts`).
    """
    best = min(m["val_ppl"] for m in run.metrics)
    hit = first_reaching(run, max(target, best))
    return None if hit is None else _cost(run, hit, costs, "equivalents")


def variant_cost(run: Any, target: float, costs: dict[str, float]) -> float | None:
    """A run's cost to its first evaluation at or below ``target``.

    ``math.inf`` if it never gets there, ``None`` without a benchmark row for its steps.
    """
    hit = first_reaching(run, target)
    return math.inf if hit is None else _cost(run, hit, costs, "equivalents")


@dataclass(frozen=True)
class Ratio:
    """Mean cost to a target over Dropout_1's mean cost, with bootstrap percentile intervals.

    Attributes:
        target: How far above Dropout_1's mean best the target lies (0.01: 1 %).
        ratio: The ratio of the means (``inf``: a seed never reaches the target).
        low, high: The interval at :data:`LEVEL`.
        low_corrected, high_corrected: The interval at :attr:`corrected_level`.
        choices: How many variants the headline is chosen among.
    """

    target: float
    ratio: float
    low: float
    high: float
    low_corrected: float
    high_corrected: float
    choices: int

    @property
    def corrected_level(self) -> float:
        """The Bonferroni level for the choice: ``1 - (1 - LEVEL) / choices``."""
        return 1 - (1 - LEVEL) / self.choices

    def text(self, corrected: bool = False) -> str:
        """``0.93 [0.71, 1.20]`` (``never`` when a seed does not reach the target)."""
        if math.isinf(self.ratio):
            return "never"
        low, high = (self.low, self.high)
        if corrected:
            low, high = (self.low_corrected, self.high_corrected)
        return f"{self.ratio:.2f} [{_bound(low)}, {_bound(high)}]"


def percent(value: float) -> str:
    """``0.95`` as ``95 %``, ``0.99286`` as ``99.3 %``."""
    return f"{100 * value:.3g} %"


def _bound(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.2f}"


def ratio_curve(
    runs: list[Any], reference: list[Any], costs: dict[str, float], choices: int = 1
) -> list[Ratio] | None:
    """A variant's cost ratio to Dropout_1 at each of :data:`TARGETS` (``None``: a cost unknown).

    Each bootstrap resample draws the variant's seeds and Dropout_1's seeds with replacement,
    independently (:data:`RESAMPLES` each, a fixed generator so a report regenerates byte for
    byte), and takes the ratio of the resampled means; a resample holding a seed that never
    reaches the target has ratio ``inf``. With three seeds a side a resample takes one of ten
    mean values per side, so the interval is coarse and, like any bootstrap on few seeds, too
    narrow rather than too wide.

    Args:
        runs: The variant's seeds.
        reference: Dropout_1's seeds.
        costs: Benchmark step-cost ratios by row name.
        choices: How many variants the headline was chosen among (Bonferroni: level
            ``1 - (1 - LEVEL) / choices`` for the corrected interval).
    """
    base = stat(reference).mean
    rng = np.random.default_rng(0)
    out = []
    for fraction in TARGETS:
        target = base * (1 + fraction)
        mine = [variant_cost(r, target, costs) for r in runs]
        theirs = [reference_cost(r, target, costs) for r in reference]
        if any(c is None for c in mine) or any(c is None for c in theirs):
            return None
        v, d = np.array(mine, dtype=float), np.array(theirs, dtype=float)
        pick_v = rng.integers(0, len(v), size=(RESAMPLES, len(v)))
        pick_d = rng.integers(0, len(d), size=(RESAMPLES, len(d)))
        draws = v[pick_v].mean(axis=1) / d[pick_d].mean(axis=1)
        alpha, corrected = 1 - LEVEL, (1 - LEVEL) / choices
        # an order statistic, not an interpolation: a resample that never arrives is inf
        quantiles = [alpha / 2, 1 - alpha / 2, corrected / 2, 1 - corrected / 2]
        low, high, low_c, high_c = np.quantile(draws, quantiles, method="inverted_cdf")
        ratio = float(v.mean() / d.mean())
        bounds = (float(low), float(high), float(low_c), float(high_c))
        out.append(Ratio(fraction, ratio, *bounds, choices))
    return out


def ratio_curves(groups: dict[str, list[Any]], costs: dict[str, float]) -> dict[str, list[Ratio]]:
    """:func:`ratio_curve` of every analytic variant on Dropout_1's setting that has costs.

    The corrected intervals count every analytic variant as a choice, with costs or not.
    """
    groups = comparable(groups)
    if "dropout-1" not in groups:
        return {}
    reference = groups["dropout-1"]
    variants = [n for n, rs in groups.items() if n != "dropout-1" and _headline(rs, n)]
    found = {n: ratio_curve(groups[n], reference, costs, len(variants)) for n in variants}
    return {n: c for n, c in found.items() if c is not None}


def ratio_lines(
    curves: dict[str, list[Ratio]], groups: dict[str, list[Any]], figure: str | None = None
) -> list[str]:
    """The table of :func:`ratio_curves` (empty without a curve).

    Args:
        curves: :func:`ratio_curves` of ``groups``.
        groups: Runs by name (for the labels).
        figure: File name of :func:`plot_ratio_curve`'s figure, shown when given.
    """
    if not curves:
        return []
    first = next(iter(curves.values()))[0]
    level, choices = first.corrected_level, first.choices
    counts = sorted({len(groups[n]) for n in (*curves, "dropout-1") if n in groups})
    seeds = " to ".join(str(c) for c in dict.fromkeys((counts[0], counts[-1])))
    head = " | ".join(f"+{percent(f)}" for f in TARGETS)
    lines = [
        "",
        "### The ratio over targets",
        "",
        "Dropout-step equivalents to reach a target, mean over the variant's seeds over the mean "
        "over Dropout_1's (a Dropout_1 seed whose best lies above the target counts its time to "
        "its best), for targets from Dropout_1's mean best (+0 %) to 5 % above it. Brackets: "
        f"{percent(LEVEL)} percentile interval of a bootstrap over seeds on both sides "
        f"({RESAMPLES:,} resamples each; with {seeds} seeds a side a coarse interval, and too "
        f"narrow rather than too wide); second line: the same at {percent(level)}, Bonferroni "
        f"for the choice among the {choices} variants here, the interval a headline chosen "
        "among them needs. "
        "*never*: a seed (or a resample's seed) does not reach the target. (n): the variant's "
        "seeds; one seed leaves only Dropout_1's spread in the interval.",
        "",
        f"| run | | {head} |",
        "|---|---|" + "---:|" * len(TARGETS),
    ]
    for name, curve in curves.items():
        label = f"{_marked(groups[name])} ({len(groups[name])})"
        plain = " | ".join(r.text() for r in curve)
        corrected = " | ".join(r.text(True) for r in curve)
        lines.append(f"| {label} | {percent(LEVEL)} | {plain} |")
        lines.append(f"| | {percent(level)} | {corrected} |")
    if figure:
        lines += ["", f"![Ratio over targets]({figure})"]
    return lines


def plot_ratio_curve(
    curves: dict[str, list[Ratio]], groups: dict[str, list[Any]], out: Path
) -> str | None:
    """:func:`ratio_curves` against the target, one line and band per variant (``None``: none)."""
    if not curves:
        return None
    require("matplotlib", "the report's figures").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    palette = plt.get_cmap("tab10")
    xs = [100 * f for f in TARGETS]
    for i, (name, curve) in enumerate(curves.items()):
        finite = [(x, r) for x, r in zip(xs, curve, strict=True) if math.isfinite(r.ratio)]
        if not finite:
            continue
        fx = [x for x, _ in finite]
        color = palette(i % 10)
        ax.plot(fx, [r.ratio for _, r in finite], color=color, marker="o", lw=1.2,
                label=f"{_marked(groups[name])} ({len(groups[name])})")  # fmt: skip
        highs = [min(r.high, 10.0) for _, r in finite]  # a band to "never" is drawn to 10
        ax.fill_between(fx, [r.low for _, r in finite], highs, color=color, alpha=0.15)
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="Dropout_1's cost")
    ax.set_xlabel("target: % above Dropout_1's mean best validation perplexity")
    ax.set_ylabel("cost ratio to Dropout_1 (dropout-step equivalents)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=f"run (seeds); band: {percent(LEVEL)} bootstrap", title_fontsize=7)
    ax.set_title("Time to quality over targets")
    fig.tight_layout()
    atomic_write(
        out / RATIO_FIGURE,
        lambda p: fig.savefig(p, format="png", dpi=110, metadata={"Software": None}),
    )
    plt.close(fig)
    return RATIO_FIGURE


def comparable(groups: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The runs on Dropout_1's data and model (a data-size run answers another question).

    Every data and model key both saved configs hold must agree (but where the data are read
    from), and the keys a summary saved before they existed defaults to (:func:`same_setting`):
    a key that newer code records is no difference.
    """
    if "dropout-1" not in groups:
        return {}
    reference = groups["dropout-1"][0].summary["config"]
    return {n: rs for n, rs in groups.items() if _same_data_and_model(rs, reference)}


def _same_data_and_model(runs: list[Any], reference: dict[str, Any]) -> bool:
    config = runs[0].summary["config"]
    if not same_setting(config, reference):
        return False
    return all(
        config[section][key] == reference[section][key]
        for section in ("data", "model")
        for key in config[section].keys() & reference[section].keys()
        if f"{section}.{key}" not in RESUMABLE
    )


def plot_time_to_quality(
    groups: dict[str, list[Any]], costs: dict[str, float], out: Path
) -> str | None:
    """Validation perplexity against dropout-step equivalents, one line per seed."""
    groups = comparable(groups)
    names = [n for n, rs in groups.items() if _headline(rs, n)]
    names = [n for n in names if dropout_step_equivalents(groups[n][0].summary["config"], 1, costs)]
    if "dropout-1" not in names or len(names) < 2:
        return None
    require("matplotlib", "the report's figures").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    palette = plt.get_cmap("tab10")
    target = stat(groups["dropout-1"]).mean
    for i, name in enumerate(names):
        for j, run in enumerate(groups[name]):
            config = run.summary["config"]
            xs = [dropout_step_equivalents(config, m["step"], costs) or 0.0 for m in run.metrics]
            ys = [m["val_ppl"] for m in run.metrics]
            label = f"{_marked(groups[name])} ({len(groups[name])})" if j == 0 else None
            ax.plot(xs, ys, color=palette(i % 10), lw=1, alpha=0.8, label=label)
    ax.axhline(target, color="k", ls="--", lw=0.8, label=f"Dropout_1's best ({target:.2f})")
    ax.set_ylim(
        0.97 * min(m["val_ppl"] for n in names for r in groups[n] for m in r.metrics), 1.25 * target
    )
    ax.set_xlabel("dropout-step equivalents (steps x benchmarked step cost)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    title = f"run (seeds); one line per seed; {LIMITED}: budget-limited"
    ax.legend(fontsize=7, title=title, title_fontsize=7)
    ax.set_title("Time to quality")
    fig.tight_layout()
    atomic_write(  # a kill leaves the old figure or the new one, whole
        out / FIGURE, lambda p: fig.savefig(p, format="png", dpi=110, metadata={"Software": None})
    )
    plt.close(fig)
    return FIGURE
