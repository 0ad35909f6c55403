"""The practitioner's table: dropout, R-Drop, fraternal dropout and the paper's replacements.

For each method (the best strength of R-Drop and of fraternal dropout by mean best validation
perplexity): best validation and test perplexity, the step cost from the benchmark (ratio to a
Dropout_1 step in the same process), and how soon it first reaches Dropout_1's best validation
perplexity (mean over Dropout_1's seeds), in steps, in dropout-step equivalents (steps times the
step cost) and in wall time. Verdict lines compare each method with Dropout_1 by the report's
test (:func:`~dropsplit.experiments.claims.compare`); the methods are selected by their saved
configs, and a budget-limited run is marked †.
"""

from __future__ import annotations

import statistics
from typing import Any

from dropsplit.experiments.claims import (
    ANALYTIC,
    EXPLICIT,
    FRATERNAL,
    LIMITED,
    RDROP,
    Runs,
    Select,
    arms,
    compare,
    config_value,
    stat,
)

# the methods' runs (a grid: its best strength) -> (label, benchmark row of its step cost)
ROWS: dict[str, tuple[Select | None, str, str]] = {
    "dropout-1": (None, "Dropout_1", "DropoutK(1)"),
    "rdrop-": (RDROP, "R-Drop", "RDrop(0.5)"),
    "fraternal-": (FRATERNAL, "fraternal dropout", "Fraternal(0.25)"),
    "analytic": (ANALYTIC, "R_approx + xi_approx", "Analytic(sampled, implicit) HVP"),
    "explicit": (EXPLICIT, "R_approx only", "Analytic(sampled) HVP"),
}


def _chosen(groups: dict[str, list[Any]]) -> dict[str, str | None]:
    """The run name of each row: Dropout_1, the best strength of a grid, the single runs."""
    if "dropout-1" not in groups:
        return dict.fromkeys(ROWS)
    runs = Runs(arms(groups))
    out: dict[str, str | None] = {}
    for key, (selector, _, _) in ROWS.items():
        found = runs.ref if selector is None else runs.best(selector)
        out[key] = None if found is None else found.name
    return out


def first_reaching(run: Any, target: float) -> dict[str, float] | None:
    """Step and seconds of the first evaluation at or below ``target`` (``None``: never)."""
    for m in run.metrics:
        if m.get("val_ppl") is not None and m["val_ppl"] <= target:
            return {"step": m["step"], "seconds": m["seconds"]}
    return None


def _reach_text(runs: list[Any], target: float, cost: float | None) -> tuple[str, str, str]:
    reached = [first_reaching(r, target) for r in runs]
    hits = [r for r in reached if r is not None]
    if not hits:
        return "never", "never", "never"
    suffix = "" if len(hits) == len(runs) else f" ({len(hits)} of {len(runs)} seeds)"
    steps = statistics.fmean(h["step"] for h in hits)
    minutes = statistics.fmean(h["seconds"] for h in hits) / 60
    equivalents = "-" if cost is None else f"{steps * cost:.0f}{suffix}"
    return f"{steps:.0f}{suffix}", equivalents, f"{minutes:.1f}{suffix}"


def practitioner_lines(
    groups: dict[str, list[Any]], step_costs: dict[str, float] | None = None
) -> list[str]:
    """The practitioner's section (empty without Dropout_1 or without a baseline run)."""
    chosen = _chosen(groups)
    if chosen["dropout-1"] is None or (chosen["rdrop-"] is None and chosen["fraternal-"] is None):
        return []
    step_costs = step_costs or {}
    reference = stat(groups["dropout-1"])
    target = reference.mean
    lines = [
        "",
        "## Dropout, R-Drop, fraternal dropout and the analytic replacement",
        "",
        "The best strength of each baseline (grid below), on the same model, data, budget and "
        f"early stopping. *Reaches*: the first evaluation at or below Dropout_1's best validation "
        f"perplexity ({target:.2f}, mean over its seeds), mean over the seeds that reach it; "
        f"{LIMITED}: budget-limited (a seed's best evaluation in the last 10 % of its budget); "
        "dropout-step equivalents are steps times the benchmarked step cost (`dropsplit bench "
        "--size char`); wall times come from runs that shared the cores, so only the "
        "step-equivalents are a clean cost comparison.",
        "",
        "| method | best val ppl | test ppl | step cost (x Dropout_1) | reaches at step | "
        "dropout-step equivalents | wall min |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    every = Runs(arms(groups))
    for key, (_, label, bench_row) in ROWS.items():
        name = chosen[key]
        if name is None:
            continue
        runs = groups[name]
        cost = step_costs.get(bench_row)
        shown = (label if key == name else runs[0].label) + (
            LIMITED if every.arms[name].limited else ""
        )
        steps, equivalents, minutes = _reach_text(runs, target, cost)
        cost_text = "-" if cost is None else f"{cost:.2f}"
        val, test = stat(runs), stat(runs, "test_ppl")
        lines.append(
            f"| {shown} | {val.text()} | {test.text()} | {cost_text} | {steps} | "
            f"{equivalents} | {minutes} |"
        )
        if name != "dropout-1":
            d = compare(every.arms["dropout-1"], every.arms[name])
            clear = "clearly better" if d.below else "clearly worse" if d.above else None
            rests = f" ({LIMITED} rests on budget-limited runs: {', '.join(d.limited)})"
            verdicts.append(
                f"- {shown} - Dropout_1 = {d.value()}: **{clear or 'no clear difference'}**"
                + (rests if d.limited else "")
                + "."
            )
    lines += ["", *verdicts, "", "Every strength tried (best validation perplexity):", ""]
    for key, strength in (("rdrop-", "method.alpha"), ("fraternal-", "method.kappa")):
        selector = ROWS[key][0]
        assert selector is not None
        grid = sorted(every.select(selector), key=lambda a: config_value(a.config, strength))
        if grid:
            shown = [groups[a.name] for a in grid]
            cells = ", ".join(f"{runs[0].label}: {stat(runs).text()}" for runs in shown)
            lines.append(f"- {ROWS[key][1]}: {cells}")
    return lines
