"""The paper's claims as data: each one the runs it needs, the effect it computes, the rule.

A :class:`Claim` names the runs it needs (a missing one makes it "not run"), and a ``judge``
that turns the best validation perplexities of those runs into an effect and a verdict with
the shared rules below; :func:`judge_claims` applies the list :data:`CLAIMS` in order. A new
architecture, corpus or baseline adds entries, not branches.

Verdict rules (stated in the report too): runs are compared by their best validation
perplexity, mean over seeds; a difference is *clear* when it exceeds twice its standard error
(seed standard deviations, at least two seeds per side); with one seed the report says so and
the verdict is at most *inconclusive* unless the difference exceeds 5 %.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
NOT_RUN, FINDING = "not run", "finding"
DROPOUT_K = "dropout-[0-9]"  # Dropout_1 ... Dropout_9 (not dropout-4-difference)
SINGLE_SEED_MARGIN = 0.05


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


def stat(runs: list[Any], key: str = "best_val_ppl") -> Stat:
    """Mean and spread of a summary field over the seeds of a run (``run.summary[key]``)."""
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


Judge = Callable[[dict[str, Stat], str | None], tuple[str, str]]


@dataclass(frozen=True)
class Claim:
    """One claim: what it says, what the paper found, the runs it needs and how it is judged.

    Attributes:
        key: Short name (the paper's letter, ``"Fig. 4"``, or a finding of ours).
        statement: The claim, as the report prints it.
        paper: What the paper reports.
        needs: Runs that must exist (any missing: "not run", naming them).
        judge: ``(stats, main_fraction) -> (verdict, effect)`` from the best validation
            perplexities per run name (``main_fraction``: training fraction of the main runs).
        one_seed_rule: A verdict that rests on a one-seed comparison is at most inconclusive.
        shows: The runs its figure draws (``fnmatch`` patterns, in drawing order).
    """

    key: str
    statement: str
    paper: str
    judge: Judge
    needs: tuple[str, ...] = ()
    one_seed_rule: bool = True
    shows: tuple[str, ...] = ()


def _judge_a(stats: dict[str, Stat], _: str | None) -> tuple[str, str]:
    """Monotone worsening with k."""
    ks = _dropout_k_names(stats)
    if len(ks) < 2 or ks[0] != "dropout-1":
        return NOT_RUN, "needs dropout-1 and a larger k"
    steps = [Comparison(stats[a], stats[b]) for a, b in zip(ks, ks[1:], strict=False)]
    end = _largest_k(stats, ks)
    total = Comparison(stats[ks[0]], stats[end])
    means = ", ".join(f"k={n.split('-')[1]}: {stats[n].mean:.2f} ({stats[n].n})" for n in ks)
    effect = f"{means}; Dropout_{end.split('-')[1]} - Dropout_1 = {total.text()}"
    no_reversal = all(s.diff > 0 or not s.clear() for s in steps)
    if total.diff > 0 and total.clear() and no_reversal:
        return (REPRODUCED if total.se is not None else INCONCLUSIVE), effect
    if total.clear() and total.diff < 0:
        return NOT_REPRODUCED, effect
    return (INCONCLUSIVE if total.se is None else NOT_REPRODUCED), effect


def _judge_b(stats: dict[str, Stat], _: str | None) -> tuple[str, str]:
    """Difference noise brings Dropout_4 back to Dropout_1."""
    back = Comparison(stats["dropout-1"], stats["dropout-4-difference"])
    gap = Comparison(stats["dropout-1"], stats["dropout-4"])
    effect = (
        f"(Dropout_4 + difference) - Dropout_1 = {back.text()}; "
        f"Dropout_4 - Dropout_1 = {gap.text()}"
    )
    if gap.diff > 0:
        effect += f"; the noise {_recovers(gap.diff, back.diff)}"
    if not gap.clear():
        return INCONCLUSIVE, effect  # nothing to recover at this scale
    if back.clear() and back.diff > 0:
        return NOT_REPRODUCED, effect
    return (REPRODUCED if back.se is not None else INCONCLUSIVE), effect


def _judge_c(stats: dict[str, Stat], _: str | None) -> tuple[str, str]:
    """Explicit only between Dropout_1 and the largest k."""
    ks = _dropout_k_names(stats)
    largest = _largest_k(stats, ks) if len(ks) > 1 else "dropout-8"
    absent = [n for n in ("dropout-1", largest, "explicit") if n not in stats]
    if absent:
        return NOT_RUN, f"missing runs: {', '.join(absent)}"
    vs_one = Comparison(stats["dropout-1"], stats["explicit"])
    vs_k = Comparison(stats[largest], stats["explicit"])
    k = largest.split("-")[1]
    effect = f"explicit - Dropout_1 = {vs_one.text()}; explicit - Dropout_{k} = {vs_k.text()}"
    beats_k = vs_k.diff < 0 and vs_k.clear()
    trails_one = vs_one.diff > 0 and vs_one.clear()
    if beats_k and trails_one:
        return (REPRODUCED if vs_one.se is not None else INCONCLUSIVE), effect
    if (vs_k.diff > 0 and vs_k.clear()) or (vs_one.diff < 0 and vs_one.clear()):
        return NOT_REPRODUCED, effect
    return INCONCLUSIVE, effect


def _judge_d(stats: dict[str, Stat], _: str | None) -> tuple[str, str]:
    """The analytic replacement close to (or better than) Dropout_1."""
    c = Comparison(stats["dropout-1"], stats["analytic"])
    rel = c.diff / stats["dropout-1"].mean
    effect = f"analytic - Dropout_1 = {c.text()} ({100 * rel:+.1f} %)"
    if abs(rel) <= 0.02 or not c.clear() or c.diff < 0:
        return (REPRODUCED if c.se is not None else INCONCLUSIVE), effect
    return NOT_REPRODUCED, effect


def _judge_e(stats: dict[str, Stat], _: str | None) -> tuple[str, str]:
    """Identity H tuned ~ l2 tuned, worse than R_approx."""
    identity, l2 = _best(stats, "identity-"), _best(stats, "l2-")
    if identity is None or l2 is None or "explicit" not in stats:
        return NOT_RUN, "needs identity-*, l2-* and explicit runs"
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
        return REPRODUCED, effect
    if vs_r.diff < 0 and vs_r.clear():
        return NOT_REPRODUCED, effect
    return INCONCLUSIVE, effect


def _judge_f(stats: dict[str, Stat], main_fraction: str | None) -> tuple[str, str]:
    """The Dropout_k - Dropout_1 gap shrinks with more data."""
    gaps = _fraction_gaps(stats, main_fraction)
    if len(gaps) < 2:
        return NOT_RUN, "needs dropout-1 and dropout-k at two data sizes"
    effect = "; ".join(f"fraction {f}: Dropout_k - Dropout_1 = {c.text()}" for f, c in gaps)
    rel = [c.diff / c.a.mean for _, c in gaps]
    shrinking = all(b < a for a, b in zip(rel, rel[1:], strict=False))
    if shrinking and gaps[0][1].clear():
        return (REPRODUCED if gaps[0][1].se is not None else INCONCLUSIVE), effect
    if not shrinking and all(c.clear() for _, c in gaps):
        return NOT_REPRODUCED, effect
    return INCONCLUSIVE, effect


def _judge_fig4(stats: dict[str, Stat], _: str | None) -> tuple[str, str]:
    """Every Dropout_k + analytic noise run close to Dropout_1."""
    names = _dropout_k_names(
        {n.removesuffix("-analytic"): s for n, s in stats.items() if n.endswith("-analytic")}
    )
    if "dropout-1" not in stats or not names:
        return NOT_RUN, "needs dropout-1 and dropout-<k>-analytic runs"
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
    return verdict, "; ".join(parts)


def _judge_baselines(stats: dict[str, Stat], _: str | None) -> tuple[str, str]:
    """The best strength of each baseline grid against Dropout_1 and the analytic replacement."""
    chosen = [b for b in (_best(stats, "rdrop-"), _best(stats, "fraternal-")) if b is not None]
    if "dropout-1" not in stats or not chosen:
        return NOT_RUN, "needs dropout-1 and rdrop-* or fraternal-* runs"
    pairs = [("dropout-1", b) for b in chosen] + [(b, "analytic") for b in chosen]
    return finding(*pairs)(stats, _)


def finding(*pairs: tuple[str, str]) -> Judge:
    """A comparison of ours with no paper verdict: ``b - a`` for each pair that exists."""

    def judge(stats: dict[str, Stat], _: str | None) -> tuple[str, str]:
        parts = [
            f"{b} - {a} = {Comparison(stats[a], stats[b]).text()}"
            for a, b in pairs
            if a in stats and b in stats
        ]
        if not parts:
            absent = sorted({n for pair in pairs for n in pair if n not in stats})
            return NOT_RUN, "missing runs: " + ", ".join(absent)
        return FINDING, "; ".join(parts)

    return judge


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "a",
        "Best validation perplexity gets worse monotonically with k (Dropout_k, k = 1, 2, 4, 8).",
        "PTB: worse as k grows; Dropout_32 still beats no dropout (~120 best val ppl). "
        "[G]: Dropout_1 83.0, Dropout_4 89.2, Dropout_8 91.6, no reg 118.6",
        _judge_a,
        shows=(DROPOUT_K, "dropout-[0-9][0-9]", "no-dropout"),
    ),
    Claim(
        "b",
        "Dropout_4 + sqrt(3/4) two-sample difference noise is within noise of Dropout_1.",
        "Dropout_4 + xi~ back to Dropout_1 (qualitative)",
        _judge_b,
        needs=("dropout-1", "dropout-4", "dropout-4-difference"),
        shows=("dropout-1", "dropout-4", "dropout-4-difference"),
    ),
    Claim(
        "c",
        "Clean loss + R_approx (explicit only) beats the largest-k Dropout_k but trails Dropout_1.",
        "R_approx beats Dropout_32, trails Dropout_1 (qualitative). [G]: explicit only 87.0 "
        "vs Dropout_1 83.0, Dropout_8 91.6",
        _judge_c,
        shows=(DROPOUT_K, "explicit", "no-dropout"),
    ),
    Claim(
        "d",
        "R_approx + xi_approx (the analytic replacement) comes close to Dropout_1.",
        "R_approx + xi_approx matches dropout (qualitative). [G]: 77.4 vs Dropout_1 83.0",
        _judge_d,
        needs=("dropout-1", "analytic"),
        shows=("dropout-1", "analytic", "no-dropout"),
    ),
    Claim(
        "e",
        "Identity H_out, tuned, is about as good as the best l2 and worse than R_approx.",
        "PTB (slides): identity H 108.76, l2 112.04, R-tilde 84.06, R_approx 84.52",
        _judge_e,
        shows=("dropout-1", "explicit", "identity-*", "l2-*", "label-*"),
    ),
    Claim(
        "f",
        "With more data the Dropout_k - Dropout_1 gap shrinks.",
        "WT103: Dropout_1 34.24, Dropout_2 33.35, Dropout_4 32.74, Dropout_8 32.78 "
        "(no implicit effect with much data)",
        _judge_f,
        shows=("data-*", DROPOUT_K),
    ),
    Claim(
        "Fig. 4",
        "Dropout_k + sqrt(1 - 1/k) xi_approx tracks Dropout_1.",
        "tracks Dropout_1 (qualitative). [G]: Dropout_8 + implicit 83.1 vs Dropout_1 83.0",
        _judge_fig4,
        shows=("dropout-1", DROPOUT_K, "dropout-*-analytic"),
    ),
    Claim(
        "grouping",
        "(ours) Per-element squares (the original code) against the mask grouping rule.",
        "the original code squares per element",
        finding(("explicit", "explicit-element"), ("analytic", "analytic-element")),
        one_seed_rule=False,
        shows=("explicit", "explicit-element", "analytic", "analytic-element"),
    ),
    Claim(
        "estimator",
        "(ours) Gradient estimators of the analytic step: HVP differences (the main "
        "runs) against exact double backward (`-exact`) and finite differences (`-fd`).",
        "-",
        finding(
            ("analytic-exact", "analytic"),
            ("analytic-exact", "analytic-fd"),
            ("analytic", "analytic-fd"),
            ("explicit", "explicit-fd"),
        ),
        one_seed_rule=False,
        shows=("analytic", "analytic-exact", "analytic-fd", "explicit", "explicit-fd"),
    ),
    Claim(
        "noise",
        "(ours) Does the analytic noise xi_approx help on top of R_approx? The implicit effect "
        "measured by its replacement: R_approx + xi_approx against R_approx alone.",
        "xi_approx is needed to match dropout (R_approx alone trails Dropout_1)",
        finding(("explicit", "analytic")),
        needs=("explicit", "analytic"),
        one_seed_rule=False,
        shows=("dropout-1", "explicit", "analytic"),
    ),
    Claim(
        "q",
        "(ours) Is (a) about the architecture or about q? Dropout_8 - Dropout_1 on the LSTM at "
        "q = 0.2 (the QRNN's and Transformer's q) and at the suite's q.",
        "-",
        finding(("q0.2-dropout-1", "q0.2-dropout-8"), ("dropout-1", "dropout-8")),
        needs=("q0.2-dropout-1", "q0.2-dropout-8"),
        one_seed_rule=False,
        shows=("dropout-1", "dropout-8", "q0.2-dropout-*"),
    ),
    Claim(
        "budget",
        "(ours) Is (a) a budget artefact? Dropout_4 and Dropout_8 against Dropout_1 with 500 "
        "epochs (`e500-*`, same patience) and with the suite's budget.",
        "-",
        finding(
            ("e500-dropout-1", "e500-dropout-4"),
            ("e500-dropout-1", "e500-dropout-8"),
            ("dropout-1", "dropout-4"),
            ("dropout-1", "dropout-8"),
        ),
        needs=("e500-dropout-1", "e500-dropout-4"),
        one_seed_rule=False,
        shows=("dropout-1", "dropout-4", "dropout-8", "e500-dropout-*"),
    ),
    Claim(
        "baselines",
        "(ours) R-Drop and fraternal dropout (the best strength of each grid) against Dropout_1 "
        "and against R_approx + xi_approx.",
        "-",
        _judge_baselines,
        one_seed_rule=False,
        shows=("dropout-1", "rdrop-*", "fraternal-*", "analytic"),
    ),
)


def judge_claims(
    stats: dict[str, Stat], main_fraction: str | None = None, claims: tuple[Claim, ...] = CLAIMS
) -> list[Verdict]:
    """One verdict per claim, in order.

    Args:
        stats: Best validation perplexity per run name.
        main_fraction: Training fraction of the main runs (for the data-size claim).
        claims: The claims to judge.
    """
    out = []
    for claim in claims:
        absent = [n for n in claim.needs if n not in stats]
        if absent:
            out.append(Verdict(claim.key, NOT_RUN, f"missing runs: {', '.join(absent)}"))
            continue
        verdict, effect = claim.judge(stats, main_fraction)
        if claim.one_seed_rule and "(1 seed)" in effect and verdict in (REPRODUCED, NOT_REPRODUCED):
            verdict = f"{INCONCLUSIVE} (1 seed; leans {verdict})"
        out.append(Verdict(claim.key, verdict, effect))
    return out
