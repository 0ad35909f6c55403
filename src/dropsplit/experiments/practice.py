"""The practitioner's table: dropout, R-Drop, fraternal dropout and the paper's replacements.

For each method (the best strength of R-Drop and of fraternal dropout by mean best validation
perplexity): best validation and test perplexity, the step cost from the benchmark (ratio to a
Dropout_1 step in the same process), and how soon it first reaches Dropout_1's best validation
perplexity (mean over Dropout_1's seeds), in steps, in dropout-step equivalents (steps times the
step cost) and in wall time. Verdict lines compare each method with Dropout_1 by the report's
rules (:class:`~dropsplit.experiments.claims.Comparison`).
"""

from __future__ import annotations

import statistics
from typing import Any

from dropsplit.experiments.claims import Comparison, stat

# run name (or prefix, for a grid) -> (label, benchmark row of its step cost)
ROWS = {
    "dropout-1": ("Dropout_1", "DropoutK(1)"),
    "rdrop-": ("R-Drop", "RDrop(0.5)"),
    "fraternal-": ("fraternal dropout", "Fraternal(0.25)"),
    "analytic": ("R_approx + xi_approx", "Analytic(sampled, implicit) HVP"),
    "explicit": ("R_approx only", "Analytic(sampled) HVP"),
}


def _best_of(groups: dict[str, list[Any]], prefix: str) -> str | None:
    names = [n for n in groups if n.startswith(prefix)] if prefix.endswith("-") else [prefix]
    names = [n for n in names if n in groups]
    return min(names, key=lambda n: stat(groups[n]).mean) if names else None


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
    chosen = {key: _best_of(groups, key) for key in ROWS}
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
        "dropout-step equivalents are steps times the benchmarked step cost (`dropsplit bench "
        "--size char`); wall times come from runs that shared the cores, so only the "
        "step-equivalents are a clean cost comparison.",
        "",
        "| method | best val ppl | test ppl | step cost (x Dropout_1) | reaches at step | "
        "dropout-step equivalents | wall min |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for key, (label, bench_row) in ROWS.items():
        name = chosen[key]
        if name is None:
            continue
        runs = groups[name]
        cost = step_costs.get(bench_row)
        shown = label if key == name else runs[0].label
        steps, equivalents, minutes = _reach_text(runs, target, cost)
        cost_text = "-" if cost is None else f"{cost:.2f}"
        val, test = stat(runs), stat(runs, "test_ppl")
        lines.append(
            f"| {shown} | {val.text()} | {test.text()} | {cost_text} | {steps} | "
            f"{equivalents} | {minutes} |"
        )
        if name != "dropout-1":
            comparison = Comparison(reference, val)
            better = "better" if comparison.diff < 0 else "worse"
            clear = "clearly " + better if comparison.clear() else "no clear difference"
            verdicts.append(f"- {shown} - Dropout_1 = {comparison.text()}: **{clear}**.")
    lines += ["", *verdicts, "", "Every strength tried (best validation perplexity):", ""]
    for prefix in ("rdrop-", "fraternal-"):
        grid = sorted(
            (n for n in groups if n.startswith(prefix)), key=lambda n: float(n[len(prefix) :])
        )
        if grid:
            cells = ", ".join(f"{groups[n][0].label}: {stat(groups[n]).text()}" for n in grid)
            lines.append(f"- {ROWS[prefix][0]}: {cells}")
    return lines
