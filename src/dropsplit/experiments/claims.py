"""The paper's claims as data: each one the runs it selects, the tests it makes, the rule.

A :class:`Claim` selects its runs by conditions on their saved config (:class:`Select`, read from
each seed's ``summary.json``), compares them with :func:`compare` (paired by training seed where
the seeds are shared, Welch's unpaired test otherwise; ``scipy.stats`` does the tests) and turns
the comparisons into a :class:`Verdict`, a structured result rendered in one place
(:meth:`Verdict.effect`, :meth:`Verdict.cell`). :func:`judge_claims` applies the list
:data:`CLAIMS` in order; a new architecture, corpus or baseline adds entries, not branches.

The rules, as the reports print them (:data:`RULES`, and each claim's :attr:`Claim.tests`):
a difference is *clear* when its 95 % confidence interval excludes 0; a verdict that rests on a
comparison with one seed on a side is at most *inconclusive*; *equivalent* means the interval lies
within ±:data:`EQUIVALENCE_MARGIN` of the reference's mean; a run whose best evaluation lies in
the last :data:`BUDGET_TAIL` of its budget is *budget-limited* (†), and a verdict resting on one
says so; a comparison of runs trained by different commits is flagged (‡).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dropsplit.optional import require

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
NOT_RUN, FINDING = "not run", "finding"
MATCHES, BETTER, WORSE = "matches", "better", "worse"  # claim (d)
ONE_SEED = f"{INCONCLUSIVE} (1 seed)"
NOTHING = f"{INCONCLUSIVE} (no gap)"  # (b) and Fig. 4: no clear Dropout_k - Dropout_1 gap
DROPOUT_K = "dropout-[0-9]"  # figure pattern: Dropout_1 ... Dropout_9 (not dropout-4-difference)
LEVEL = 0.95  # confidence level of every interval
EQUIVALENCE_MARGIN = 0.02  # of the reference's mean best validation perplexity
BUDGET_TAIL = 0.10  # a best evaluation in the last 10 % of the budget: budget-limited
BASE_SEED = 1111  # train.seed of seed index 0 (summaries without a saved train.seed)
LIMITED, MIXED = "†", "‡"
MARGIN_TEXT = f"{EQUIVALENCE_MARGIN * 100:.0f} %"

RULES = (
    "Runs are compared by each seed's best validation perplexity. A comparison `b - a` is "
    "paired by training seed "
    "where the two runs share two or more seeds (the mean of the per-seed differences with its "
    "t interval on n - 1 degrees of freedom, `scipy.stats.ttest_rel`), and Welch's unpaired "
    "test otherwise (`scipy.stats.ttest_ind(equal_var=False)`, Welch-Satterthwaite degrees of "
    "freedom). Effects read `difference [95 % confidence interval], p (test, n)`. A difference "
    "is *clear* when its interval excludes 0; *equivalent* when the interval lies within "
    f"±{MARGIN_TEXT} of the reference run's mean. With one seed on a side there is "
    "no test, and a verdict resting on it is at most *inconclusive (1 seed)*. Each rule is "
    "sign-aware and says which sign reproduces the claim (*what the verdict tests*). "
    f"{LIMITED} marks a *budget-limited* run (a seed's best evaluation in the last "
    f"{BUDGET_TAIL * 100:.0f} % of its epochs or steps: it may still have been improving) and a "
    f"verdict resting on one; {MIXED} marks a comparison of runs trained by different commits."
)


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


# ---------------------------------------------------------------- what each seed's files say


def budget_used(summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> float | None:
    """Where a run's best evaluation lies in its budget: 1.0 is the last epoch (or step) allowed.

    The budget is ``train.epochs`` and, when set, ``train.max_steps`` of the saved config (the
    larger share counts: the budget that binds); the best evaluation is the lowest validation
    perplexity of ``metrics.jsonl`` (the first, on ties). ``None``: no budget or no evaluation.
    """
    evaluations = [m for m in metrics if m.get("val_ppl") is not None]
    train = summary.get("config", {}).get("train", {})
    if not evaluations:
        return None
    best = min(evaluations, key=lambda m: m["val_ppl"])
    shares = []
    if train.get("epochs") and "epoch" in best:
        shares.append(best["epoch"] / train["epochs"])
    if train.get("max_steps") and "step" in best:
        shares.append(best["step"] / train["max_steps"])
    return max(shares) if shares else None


def budget_limited(summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a run's best evaluation lies in the last :data:`BUDGET_TAIL` of its budget."""
    used = budget_used(summary, metrics)
    return used is not None and used > 1 - BUDGET_TAIL


def code_of(summary: Mapping[str, Any]) -> tuple[tuple[str, ...], bool]:
    """The code versions that trained a run, and whether the record is complete.

    Reads ``summary["git"]`` (``{"commit", "dirty", "numerics"}`` of the code that started the
    run, ``None`` when neither is known) with ``summary["resumed"]`` (each resume's ``{"step",
    "commit", "dirty", "numerics"}``), or a plain ``summary["commit"]`` (one commit, or a list).
    A clean checkout that records its numerics version (``dropsplit.training.trainer.NUMERICS``)
    is that version (``numerics <n>``: commits that change no trained number compare as one);
    otherwise the commit is the version, and a dirty checkout its own (``<commit>+dirty``).
    Complete: the code that started the run is recorded, and every resume's; summaries from before
    the record have neither (``((), False)``).
    """

    def version(entry: Any) -> str | None:
        if isinstance(entry, str):
            return entry or None
        if not isinstance(entry, Mapping):
            return None
        if entry.get("numerics") is not None and not entry.get("dirty"):
            return f"numerics {entry['numerics']}"
        if not entry.get("commit"):
            return None
        return str(entry["commit"]) + ("+dirty" if entry.get("dirty") else "")

    if "git" in summary or "resumed" in summary:
        entries = [summary.get("git"), *summary.get("resumed", [])]
    else:
        commit = summary.get("commit")
        entries = list(commit) if isinstance(commit, list | tuple) else [commit]
    versions = [version(e) for e in entries]
    known = tuple(dict.fromkeys(v for v in versions if v is not None))
    return known, bool(versions) and all(v is not None for v in versions)


def training_seed(run: Any) -> int:
    """The seed a run was trained with: its saved ``train.seed`` (else ``1111 + index``)."""
    seed = run.summary.get("config", {}).get("train", {}).get("seed")
    return int(seed) if seed is not None else BASE_SEED + int(run.seed)


@dataclass(frozen=True)
class Arm:
    """One run over its seeds: best validation perplexity by training seed, and its provenance.

    Attributes:
        name: The run's name (how the effects name it).
        config: The saved config of its first seed.
        values: Best validation perplexity by training seed (or a derived quantity).
        limited: ``"name (k of n seeds)"`` for each run with budget-limited seeds it rests on.
        versions: The commits recorded for its seeds.
        unrecorded: How many of its seeds lack a complete record of their commits.
    """

    name: str
    config: Mapping[str, Any]
    values: Mapping[int, float]
    limited: tuple[str, ...] = ()
    versions: frozenset[str] = frozenset()
    unrecorded: int = 0

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean over seeds."""
        return statistics.fmean(self.values.values())

    @property
    def shown(self) -> str:
        """The name, marked † when the run is budget-limited."""
        return self.name + (LIMITED if self.limited else "")


def arm(name: str, runs: list[Any]) -> Arm:
    """The :class:`Arm` of a run's seeds (objects with ``seed``, ``summary``, ``metrics``)."""
    limited = [r for r in runs if budget_limited(r.summary, r.metrics)]
    codes = [code_of(r.summary) for r in runs]
    return Arm(
        name,
        runs[0].summary.get("config", {}),
        {training_seed(r): float(r.summary["best_val_ppl"]) for r in runs},
        (f"{name} ({len(limited)} of {len(runs)} seed{'s' if len(runs) > 1 else ''})",)
        if limited
        else (),
        frozenset(v for versions, _ in codes for v in versions),
        sum(1 for _, complete in codes if not complete),
    )


def arms(groups: Mapping[str, list[Any]]) -> dict[str, Arm]:
    """An :class:`Arm` per run name."""
    return {name: arm(name, runs) for name, runs in groups.items()}


# ---------------------------------------------------------------- the tests


@dataclass(frozen=True)
class Difference:
    """``b - a``: the mean difference, its 95 % confidence interval and p (``scipy.stats``).

    Attributes:
        a: The first arm's name as shown (with † when budget-limited).
        b: The second arm's name as shown.
        diff: Mean of the paired differences, or difference of the means.
        test: ``"paired"``, ``"Welch"`` or ``""`` (no test: one seed on a side).
        n: ``(pairs, seeds of a, seeds of b)``.
        low: Lower end of the interval (``None`` without a test).
        high: Upper end of the interval.
        p: Two-sided p value of ``diff == 0``.
        reference: The mean of ``a`` (the scale of the equivalence margin).
        limited: The budget-limited runs it rests on.
        code: ``"one"`` (one recorded commit), ``"mixed"``, ``"partly unknown"`` or
            ``"unknown"`` (no seed records its commit).
        versions: The recorded commits.
    """

    a: str
    b: str
    diff: float
    test: str
    n: tuple[int, int, int]
    low: float | None
    high: float | None
    p: float | None
    reference: float
    limited: tuple[str, ...] = ()
    code: str = "unknown"
    versions: tuple[str, ...] = ()

    @property
    def tested(self) -> bool:
        """Whether a test was made (two or more seeds a side, or two or more pairs)."""
        return self.low is not None and self.high is not None

    @property
    def above(self) -> bool:
        """Clearly above 0: the interval's lower end is above 0."""
        return self.low is not None and self.low > 0

    @property
    def below(self) -> bool:
        """Clearly below 0: the interval's upper end is below 0."""
        return self.high is not None and self.high < 0

    @property
    def clear(self) -> bool:
        """The interval excludes 0."""
        return self.above or self.below

    def equivalent(self, margin: float = EQUIVALENCE_MARGIN) -> bool:
        """The interval lies within ``±margin`` of the reference's mean."""
        bound = margin * abs(self.reference)
        return self.tested and -bound <= self.low <= self.high <= bound  # type: ignore[operator]

    def value(self) -> str:
        """``+d [lo, hi], p = x (paired n = 3)``, or ``+d (1 seed: no test)``."""
        if not self.tested:
            return f"{self.diff:+.2f} (1 seed: no test)"
        pairs, na, nb = self.n
        if self.test == "paired":
            counts = f"n = {pairs}" + ("" if na == nb == pairs else f" of {na} and {nb} seeds")
        else:
            counts = f"n = {na} and {nb}"
        p = "p < 0.001" if self.p is not None and self.p < 0.001 else f"p = {self.p:.2g}"
        return (
            f"{self.diff:+.2f} [{self.low:+.2f}, {self.high:+.2f}], {p} ({self.test} {counts})"
            + (MIXED if self.code == "mixed" else "")
        )

    def line(self) -> str:
        """``b - a = value``."""
        return f"{self.b} - {self.a} = {self.value()}"


def _code(a: Arm, b: Arm) -> tuple[str, tuple[str, ...]]:
    versions = tuple(sorted(a.versions | b.versions))
    unrecorded = a.unrecorded + b.unrecorded
    if len(versions) > 1:
        return "mixed", versions
    if not unrecorded:
        return "one", versions
    return ("partly unknown" if versions else "unknown"), versions


def _same(values: list[float]) -> bool:
    """All equal up to rounding (no spread to test)."""
    return math.isclose(max(values), min(values), rel_tol=1e-9, abs_tol=1e-12)


def compare(a: Arm, b: Arm) -> Difference:
    """``b - a``: paired by training seed where two or more are shared, else Welch's test.

    ``scipy.stats.ttest_rel`` (paired) or ``ttest_ind(equal_var=False)`` (unpaired) give the
    95 % interval and p; with one seed on a side there is no test. Values with no spread at all
    (the matrix's stand-ins) get a zero-width interval without a test.
    """
    shared = sorted(set(a.values) & set(b.values))
    n = (len(shared), a.n, b.n)
    low = high = p = None
    if len(shared) >= 2:
        xs, ys = [a.values[s] for s in shared], [b.values[s] for s in shared]
        diffs = [y - x for x, y in zip(xs, ys, strict=True)]
        diff, test = statistics.fmean(diffs), "paired"
        spread = not _same(diffs)
    else:
        xs, ys = list(a.values.values()), list(b.values.values())
        diff = b.mean - a.mean
        test = "Welch" if a.n >= 2 and b.n >= 2 else ""
        spread = not (_same(xs) and _same(ys))
    if test and not spread:
        low = high = diff
        p = 1.0 if diff == 0 else 0.0
    elif test:
        stats = require("scipy.stats", "the verdicts' tests")
        if test == "paired":
            result = stats.ttest_rel(ys, xs)
        else:
            result = stats.ttest_ind(ys, xs, equal_var=False)
        interval = result.confidence_interval(LEVEL)
        low, high, p = float(interval.low), float(interval.high), float(result.pvalue)
    code, versions = _code(a, b)
    limited = tuple(dict.fromkeys((*a.limited, *b.limited)))
    interval = (low, high, p)
    return Difference(a.shown, b.shown, diff, test, n, *interval, a.mean, limited, code, versions)


# ---------------------------------------------------------------- selecting runs by config


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """A dotted key of a saved config, with the defaults of summaries saved before it existed.

    ``method.curvature`` was called ``method.explicit``; ``model.name`` was always ``lstm``.
    """
    section, _, name = key.partition(".")
    values = config.get(section, {})
    if key == "method.curvature" and "curvature" not in values:
        return values.get("explicit", "sampled")
    return values.get(name, DEFAULTS.get(key))


DEFAULTS: dict[str, Any] = {
    "model.name": "lstm",
    "method.k": 1,
    "method.noise": "none",
    "method.grouping": "mask",
    "method.implicit": True,
    "method.explicit_every": 1,
    "method.implicit_every": 1,
    "method.start_step": 0,
    "method.explicit_scale": 1.0,
    "method.implicit_scale": 1.0,
    "optim.name": "adam",
    "train.max_steps": 0,
}
SETTING = ("model.name", "data.corpus", "data.train_fraction")  # and every model.p_* both have
BUDGET = ("train.epochs", "train.max_steps")


@dataclass(frozen=True)
class Relative:
    """A condition against the reference run's value: ``same``, ``differs`` or ``above``."""

    kind: str

    def __call__(self, value: Any, reference: Any) -> bool:
        """Whether ``value`` meets the condition against the reference's ``reference``."""
        if self.kind == "same":
            return bool(value == reference)
        if self.kind == "above":
            return value is not None and reference is not None and value > reference
        return bool(value != reference)


@dataclass(frozen=True)
class Among:
    """A condition met by any of ``values``."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Select:
    """Runs whose saved config meets conditions: ``key == value`` or a :class:`Relative` one.

    Attributes:
        name: The suites' name for such a run (what "missing runs" names).
        where: ``(dotted key, value or :class:`Relative` condition)`` pairs.
        setting: Whether the run must share Dropout_1's model, corpus, training fraction and
            dropout probabilities (see :data:`SETTING`).
    """

    name: str
    where: tuple[tuple[str, Any], ...]
    setting: bool = True

    def __add__(self, other: Mapping[str, Any]) -> Select:
        return Select(self.name, (*self.where, *other.items()), self.setting)

    def named(self, name: str) -> Select:
        """The same conditions under another name."""
        return Select(name, self.where, self.setting)

    def matches(self, config: Mapping[str, Any], reference: Mapping[str, Any] | None) -> bool:
        """Whether ``config`` meets every condition (relative ones against ``reference``)."""
        for key, wanted in self.where:
            value = config_value(config, key)
            if isinstance(wanted, Relative):
                if reference is None or not wanted(value, config_value(reference, key)):
                    return False
            elif isinstance(wanted, Among):
                if value not in wanted.values:
                    return False
            elif value != wanted:
                return False
        return True


def same_setting(config: Mapping[str, Any], reference: Mapping[str, Any]) -> bool:
    """Same model, corpus, training fraction and dropout probabilities as ``reference``."""
    if any(config_value(config, k) != config_value(reference, k) for k in SETTING):
        return False
    model, ref = config.get("model", {}), reference.get("model", {})
    return all(model[k] == ref[k] for k in model if k.startswith("p_") and k in ref)


def same_budget(config: Mapping[str, Any], reference: Mapping[str, Any]) -> bool:
    """Same epochs and step cap as ``reference``."""
    return all(config_value(config, k) == config_value(reference, k) for k in BUDGET)


class Runs:
    """A report's runs, selectable by conditions on their saved config.

    Args:
        arms: An :class:`Arm` per run name.
        reference: The name of the reference run (Dropout_1), whose config the relative
            conditions and the setting compare against.
    """

    def __init__(self, arms: Mapping[str, Arm], reference: str = "dropout-1") -> None:
        self.arms = dict(arms)
        self.ref: Arm | None = self.arms.get(reference)

    def select(self, selector: Select) -> list[Arm]:
        """The runs that match, those with Dropout_1's budget first, then by seeds and name."""
        ref = None if self.ref is None else self.ref.config
        found = [
            a
            for a in self.arms.values()
            if selector.matches(a.config, ref)
            and (not selector.setting or ref is None or same_setting(a.config, ref))
        ]
        return sorted(
            found,
            key=lambda a: (ref is not None and not same_budget(a.config, ref), -a.n, a.name),
        )

    def one(self, selector: Select) -> Arm | None:
        """The first run :meth:`select` finds (``None``: none)."""
        found = self.select(selector)
        return found[0] if found else None

    def best(self, selector: Select) -> Arm | None:
        """The run of a grid with the lowest mean (its strength chosen on the same seeds)."""
        found = self.select(selector)
        return min(found, key=lambda a: (a.mean, a.name)) if found else None

    def by_k(self, selector: Select, budget: Arm | None = None) -> dict[int, Arm]:
        """Runs by ``method.k``, sorted; for each k the first :meth:`select` finds.

        With ``budget``, a run with its epochs and step cap comes first; ``budget`` itself
        (Dropout_1) is the k = 1 run when it matches.
        """
        found = self.select(selector)
        if budget is not None:
            found.sort(key=lambda a: (a is not budget, not same_budget(a.config, budget.config)))
        out: dict[int, Arm] = {}
        for a in found:
            out.setdefault(int(config_value(a.config, "method.k")), a)
        return dict(sorted(out.items()))


# the runs the claims compare
DROPOUT = Select("dropout-k", (("method.name", "dropout"), ("method.noise", "none")))
DIFFERENCE = Select(
    "dropout-4-difference",
    (("method.name", "dropout"), ("method.k", 4), ("method.noise", "difference")),
)
NOISED = Select("dropout-k-analytic", (("method.name", "dropout"), ("method.noise", "analytic")))
_ANALYTIC = (
    ("method.name", "analytic"),
    ("method.curvature", "sampled"),
    ("method.explicit_every", 1),
    ("method.start_step", 0),
    ("method.explicit_scale", 1.0),
)
# the main analytic runs differentiate by HVP differences (the language-model suites) or exactly
# (the digits race: HVP differences are wrong on ReLU networks); finite differences are a control
_MAIN = (
    ("method.grouping", "mask"),
    ("method.gradient", Among(("hvp-difference", "double-backward", "jvp"))),
)
_BOTH = (("method.implicit", True), ("method.implicit_every", 1), ("method.implicit_scale", 1.0))
ANALYTIC = Select("analytic", (*_ANALYTIC, *_BOTH, *_MAIN))
EXPLICIT = Select("explicit", (*_ANALYTIC, ("method.implicit", False), *_MAIN))
_ELEMENT = {"method.grouping": "element", "method.gradient": "hvp-difference"}
ANALYTIC_ELEMENT = Select("analytic-element", (*_ANALYTIC, *_BOTH)) + _ELEMENT
EXPLICIT_ELEMENT = Select("explicit-element", (*_ANALYTIC, ("method.implicit", False))) + _ELEMENT
_EXACT = {"method.grouping": "mask", "method.gradient": "double-backward"}
_FD = {"method.grouping": "mask", "method.gradient": "finite-difference"}
ANALYTIC_EXACT = Select("analytic-exact", (*_ANALYTIC, *_BOTH)) + _EXACT
ANALYTIC_FD = Select("analytic-fd", (*_ANALYTIC, *_BOTH)) + _FD
EXPLICIT_FD = Select("explicit-fd", (*_ANALYTIC, ("method.implicit", False))) + _FD
IDENTITY = Select(
    "identity-*",
    (("method.name", "analytic"), ("method.curvature", "identity"), ("method.implicit", False)),
)
NONE = Select("no-dropout", (("method.name", "none"),))
RDROP = Select("rdrop-*", (("method.name", "rdrop"),))
FRATERNAL = Select("fraternal-*", (("method.name", "fraternal"),))
ANY_SIZE = Select("data-*-dropout-k", DROPOUT.where, setting=False)
_SAME = tuple((k, Relative("same")) for k in (*SETTING, *BUDGET))
OTHER_Q = Select(
    "q0.2-dropout-k", (*DROPOUT.where, *_SAME, ("model.p_input", Relative("differs"))), False
)
LONGER = Select("e500-dropout-k", (*DROPOUT.where, ("train.epochs", Relative("above"))))


# ---------------------------------------------------------------- verdicts


Part = str | Difference | tuple[str, Difference]  # text, a comparison, or one with a prefix


@dataclass(frozen=True)
class Outcome:
    """What a judge returns: the verdict, the effect's parts, the comparisons it rests on."""

    verdict: str
    parts: tuple[Part, ...] = ()
    decisive: tuple[Difference, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict with the comparisons it rests on; rendered by :meth:`effect`.

    Attributes:
        claim: The claim's key.
        verdict: ``reproduced``, ``not reproduced``, ``inconclusive``, ``inconclusive (1 seed)``,
            ``matches`` / ``better`` / ``worse`` (claim d), ``finding`` or ``not run``.
        parts: The effect, in order: text and :class:`Difference` items.
        decisive: The comparisons the verdict rests on (their budget-limited runs and code
            versions are noted).
    """

    claim: str
    verdict: str
    parts: tuple[Part, ...] = ()
    decisive: tuple[Difference, ...] = ()

    @property
    def limited(self) -> tuple[str, ...]:
        """The budget-limited runs the verdict rests on."""
        return tuple(dict.fromkeys(r for d in self.decisive for r in d.limited))

    @property
    def versions(self) -> list[str]:
        """The code versions of the comparisons it rests on, as the reports print them."""
        return sorted({_short(v) for d in self.decisive for v in d.versions})

    @property
    def code(self) -> str:
        """``"mixed"``, ``"partly unknown"``, ``"unknown"`` or ``"one"`` over its comparisons."""
        codes = {d.code for d in self.decisive}
        for code in ("mixed", "partly unknown", "unknown"):
            if code in codes:
                return code
        return "one"

    @property
    def shown(self) -> str:
        """The verdict, marked † when it rests on a budget-limited run and ‡ on mixed code."""
        return (
            self.verdict
            + (LIMITED if self.limited else "")
            + (MIXED if self.code == "mixed" else "")
        )

    @property
    def effect(self) -> str:
        """The effect's parts, then what the verdict rests on (budget, code versions)."""
        text = [
            p if isinstance(p, str) else p.line() if isinstance(p, Difference) else _prefixed(p)
            for p in self.parts
        ]
        if self.limited:
            text.append(f"{LIMITED} rests on budget-limited runs: {', '.join(self.limited)}")
        if self.code == "mixed":
            text.append(f"{MIXED} mixed code versions: {', '.join(self.versions)}")
        elif self.code == "partly unknown":
            text.append("code versions partly unrecorded")
        return "; ".join(text)

    def cell(self) -> str:
        """``**verdict**<br>effect``: a matrix cell."""
        return f"**{self.shown}**<br>{self.effect}"


def _prefixed(part: tuple[str, Difference]) -> str:
    return f"{part[0]}: {part[1].line()}"


Judge = Callable[[Runs], Outcome]


@dataclass(frozen=True)
class Claim:
    """One claim: what it says, what the paper found, the runs it needs and how it is judged.

    Attributes:
        key: Short name (the paper's letter, ``"Fig. 4"``, or a finding of ours).
        statement: The claim, as the report prints it.
        paper: What the paper reports.
        tests: What the verdict tests, in words (the report prints it).
        judge: ``runs -> Outcome``.
        needs: Runs that must exist (any missing: "not run", naming them).
        one_seed_rule: A verdict resting on a one-seed comparison is at most inconclusive.
        shows: The runs its figure draws (``fnmatch`` patterns of run names, in drawing order).
    """

    key: str
    statement: str
    paper: str
    tests: str
    judge: Judge
    needs: tuple[Select, ...] = ()
    one_seed_rule: bool = True
    shows: tuple[str, ...] = ()


def _needs_reference(runs: Runs) -> Arm:
    if runs.ref is None:
        raise _Missing(("dropout-1",))
    return runs.ref


class _Missing(Exception):
    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        super().__init__(", ".join(self.names))


def _largest_k(ks: dict[int, Arm]) -> int:
    """The largest k with two or more seeds (a comparison with a test), else the largest.

    A one-seed Dropout_8 added to a three-seed suite must not turn its verdicts into one-seed ones.
    """
    seeded = [k for k, a in ks.items() if k > 1 and a.n > 1]
    return seeded[-1] if seeded else max(ks)


def _judge_a(runs: Runs) -> Outcome:
    """Monotone worsening with k."""
    one = _needs_reference(runs)
    ks = runs.by_k(DROPOUT, one)
    if len(ks) < 2 or ks.get(1) is not one:
        raise _Missing(("dropout-<k> (k > 1)",))
    steps = [compare(ks[a], ks[b]) for a, b in zip(ks, list(ks)[1:], strict=False)]
    total = compare(one, ks[_largest_k(ks)])
    means = ", ".join(f"k={k}: {a.mean:.2f} ({a.n})" for k, a in ks.items())
    reversals = [s for s in steps if s.below]
    # a step down that one seed cannot test: the monotone claim is at most inconclusive
    untested = [s for s in steps if not s.tested and s.diff < 0]
    parts: tuple[Part, ...] = (means, total, *reversals, *untested)
    if reversals:
        return Outcome(NOT_REPRODUCED, parts, (total, *reversals))
    if total.above:
        return Outcome(REPRODUCED, parts, (total, *untested))
    if total.below or total.equivalent():
        return Outcome(NOT_REPRODUCED, parts, (total,))
    return Outcome(INCONCLUSIVE, parts, (total,))


def _noise_back(one: Arm, k: Arm | None, noised: Arm) -> Outcome:
    """Does a noised Dropout_k come back to Dropout_1?

    Needs a clear Dropout_k - Dropout_1 gap; reproduced when noised - Dropout_k is clearly below 0
    and noised - Dropout_1 not clearly above 0; not reproduced when noised - Dropout_1 is clearly
    above 0 (all or part of the gap left); otherwise inconclusive. ``NOTHING`` is the verdict
    when there is no clear gap to recover.
    """
    left = compare(one, noised)
    if k is None:
        return Outcome(NOT_REPRODUCED if left.above else INCONCLUSIVE, (left,), (left,))
    gap, back = compare(one, k), compare(k, noised)
    parts: tuple[Part, ...] = (left, gap, back)
    if gap.diff > 0:
        parts += (f"the noise recovers {100 * (1 - left.diff / gap.diff):.0f} % of the gap",)
    if not gap.above:
        sign = "a gap of the wrong sign" if gap.below else "no clear gap"
        return Outcome(NOTHING, (*parts, f"{sign}: nothing to recover"), (gap,))
    if left.above:
        return Outcome(NOT_REPRODUCED, parts, (gap, left, back))
    if back.below:
        return Outcome(REPRODUCED, parts, (gap, left, back))
    return Outcome(INCONCLUSIVE, parts, (gap, left, back))


def _judge_b(runs: Runs) -> Outcome:
    """Difference noise brings Dropout_4 back to Dropout_1."""
    one = _needs_reference(runs)
    noised = runs.one(DIFFERENCE)
    four = runs.by_k(DROPOUT, one).get(4)
    if noised is None or four is None:
        raise _Missing(n for n, a in (("dropout-4", four), (DIFFERENCE.name, noised)) if a is None)
    outcome = _noise_back(one, four, noised)
    return Outcome(outcome.verdict.replace(NOTHING, INCONCLUSIVE), outcome.parts, outcome.decisive)


def _judge_c(runs: Runs) -> Outcome:
    """Explicit only between Dropout_1 and the largest k."""
    one = _needs_reference(runs)
    ks = runs.by_k(DROPOUT, one)
    explicit = runs.one(EXPLICIT)
    if len(ks) < 2 or explicit is None:
        named = (("dropout-8", len(ks) > 1), ("explicit", explicit))
        raise _Missing(n for n, ok in named if not ok)
    vs_one, vs_k = compare(one, explicit), compare(ks[_largest_k(ks)], explicit)
    parts = (vs_one, vs_k)
    if vs_k.below and vs_one.above:
        return Outcome(REPRODUCED, parts, parts)
    if vs_k.above or vs_one.below:
        return Outcome(NOT_REPRODUCED, parts, parts)
    return Outcome(INCONCLUSIVE, parts, parts)


def _judge_d(runs: Runs) -> Outcome:
    """The analytic replacement matches, beats or trails Dropout_1."""
    one, analytic = _needs_reference(runs), runs.one(ANALYTIC)
    if analytic is None:
        raise _Missing(("analytic",))
    c = compare(one, analytic)
    parts: tuple[Part, ...] = (c, f"{100 * c.diff / one.mean:+.1f} %")
    if c.equivalent():
        return Outcome(MATCHES, parts, (c,))
    if c.below:
        return Outcome(BETTER, parts, (c,))
    if c.above:
        return Outcome(WORSE, parts, (c,))
    return Outcome(INCONCLUSIVE, parts, (c,))


def _l2_grid(runs: Runs) -> list[Arm]:
    """Runs without dropout whose optimizer differs from Dropout_1's (weight decay or AdamW)."""
    ref = runs.ref.config if runs.ref is not None else {}
    keys = ("optim.weight_decay", "optim.name")
    return [
        a
        for a in runs.select(NONE)
        if any(config_value(a.config, k) != config_value(ref, k) for k in keys)
    ]


def _judge_e(runs: Runs) -> Outcome:
    """Identity H tuned ~ l2 tuned, worse than R_approx."""
    identity, explicit = runs.best(IDENTITY), runs.one(EXPLICIT)
    grid = _l2_grid(runs)
    l2 = min(grid, key=lambda a: (a.mean, a.name)) if grid else None
    if identity is None or l2 is None or explicit is None:
        named = (("identity-*", identity), ("l2-*", l2), ("explicit", explicit))
        raise _Missing(n for n, a in named if a is None)
    vs_l2, vs_r = compare(l2, identity), compare(explicit, identity)
    parts = (
        f"best identity {identity.name} {identity.mean:.2f}, best l2 {l2.name} {l2.mean:.2f} "
        f"(strengths chosen on the same seeds), R_approx {explicit.mean:.2f}",
        vs_l2,
        vs_r,
    )
    if vs_l2.equivalent() and vs_r.above:
        return Outcome(REPRODUCED, parts, (vs_l2, vs_r))
    if vs_r.below or (vs_l2.clear and not vs_l2.equivalent()):
        return Outcome(NOT_REPRODUCED, parts, (vs_l2, vs_r))
    return Outcome(INCONCLUSIVE, parts, (vs_l2, vs_r))


def _relative_gap(one: Arm, k: Arm, fraction: float) -> Arm:
    """Per shared seed, ``100 (Dropout_k - Dropout_1) / Dropout_1``: the gap in % at one size."""
    seeds = sorted(set(one.values) & set(k.values))
    return Arm(
        f"gap (%) at {fraction:g}",
        {},
        {s: 100 * (k.values[s] - one.values[s]) / one.values[s] for s in seeds},
        tuple(dict.fromkeys((*one.limited, *k.limited))),
        one.versions | k.versions,
        one.unrecorded + k.unrecorded,
    )


def dropout_sizes(runs: Runs) -> dict[float, dict[int, Arm]]:
    """Dropout_k runs of Dropout_1's model and corpus by training fraction, then by k.

    At each size and k, the run :meth:`Runs.by_k` puts first: at the main fraction the main
    runs (Dropout_1's budget); elsewhere the runs of the longest budget (epochs) at which
    Dropout_1 and another k were both trained, so a size whose runs were extended is compared
    at its extended budget, then the run with most seeds.
    """
    ref = runs.ref
    found = [a for a in runs.select(ANY_SIZE) if ref is None or _same_model(a.config, ref.config)]

    def fraction(a: Arm) -> float:
        return float(config_value(a.config, "data.train_fraction"))

    sizes = {}
    for f in sorted({fraction(a) for a in found}):
        at_size = [a for a in found if fraction(a) == f]
        main = ref if ref is not None and fraction(ref) == f else None
        if main is None:
            at_size = _longest_paired_budget(at_size)
        here = Runs({a.name: a for a in at_size}, reference="")
        sizes[f] = here.by_k(ANY_SIZE, main)
    return sizes


def _longest_paired_budget(found: list[Arm]) -> list[Arm]:
    """The runs of the most epochs at which a Dropout_1 and a Dropout_k > 1 were trained."""

    def epochs(a: Arm) -> int:
        return int(config_value(a.config, "train.epochs") or 0)

    def k(a: Arm) -> int:
        return int(config_value(a.config, "method.k"))

    paired = [
        e
        for e in {epochs(a) for a in found}
        if any(k(a) == 1 and epochs(a) == e for a in found)
        and any(k(a) > 1 and epochs(a) == e for a in found)
    ]
    return [a for a in found if epochs(a) == max(paired)] if paired else found


def fraction_pairs(runs: Runs) -> dict[float, tuple[Arm, Arm]]:
    """``{training fraction: (Dropout_1, Dropout_k)}``, the same k at every size if one is."""
    sizes = {f: ks for f, ks in dropout_sizes(runs).items() if 1 in ks and len(ks) > 1}
    common = set.intersection(*(set(ks) for ks in sizes.values())) if sizes else set()
    common.discard(1)
    return {f: (ks[1], ks[max(common) if common else max(ks)]) for f, ks in sizes.items()}


def _same_model(config: Mapping[str, Any], reference: Mapping[str, Any]) -> bool:
    keys = ("model.name", "data.corpus")
    if any(config_value(config, k) != config_value(reference, k) for k in keys):
        return False
    model, ref = config.get("model", {}), reference.get("model", {})
    return all(model[k] == ref[k] for k in model if k.startswith("p_") and k in ref)


def _judge_f(runs: Runs) -> Outcome:
    """The relative Dropout_k - Dropout_1 gap shrinks with more data."""
    _needs_reference(runs)
    pairs = fraction_pairs(runs)
    if len(pairs) < 2:
        raise _Missing(("dropout-1 and dropout-k at two data sizes",))
    parts: list[Part] = []
    for fraction, (one, k) in pairs.items():
        parts.append((f"fraction {fraction:g}", compare(one, k)))
    (small, (one_s, k_s)), (large, (one_l, k_l)) = list(pairs.items())[0], list(pairs.items())[-1]
    at_small = _relative_gap(one_s, k_s, small)
    at_large = _relative_gap(one_l, k_l, large)
    first = compare(one_s, k_s)
    if at_small.n < 2 or at_large.n < 2:  # no per-seed gaps to compare: no test of the change
        untested = compare(at_small, at_large) if at_small.n and at_large.n else first
        return Outcome(INCONCLUSIVE, (*parts, "fewer than two paired seeds at a size"), (untested,))
    change = compare(at_small, at_large)
    parts.append(change)
    if not first.above:
        return Outcome(INCONCLUSIVE, (*parts, "no clear gap at the smallest size"), (first,))
    if change.below:
        return Outcome(REPRODUCED, tuple(parts), (first, change))
    if change.above:
        return Outcome(NOT_REPRODUCED, tuple(parts), (first, change))
    return Outcome(INCONCLUSIVE, tuple(parts), (first, change))


def _judge_fig4(runs: Runs) -> Outcome:
    """Every Dropout_k + analytic noise run back to Dropout_1 (as (b), for each k)."""
    one = _needs_reference(runs)
    noised = runs.by_k(NOISED, one)
    if not noised:
        raise _Missing(("dropout-<k>-analytic",))
    ks = runs.by_k(DROPOUT, one)
    parts: list[Part] = []
    verdicts, decisive = [], []
    for k, arm_k in noised.items():
        outcome = _noise_back(one, ks.get(k), arm_k)
        first, *rest = outcome.parts
        shown = outcome.verdict.replace(NOTHING, INCONCLUSIVE)
        assert isinstance(first, Difference)
        parts += [(f"k={k} ({shown})", first), *rest]
        verdicts.append(outcome.verdict)
        decisive += list(outcome.decisive)
    if NOT_REPRODUCED in verdicts:
        verdict = NOT_REPRODUCED
    elif REPRODUCED in verdicts and set(verdicts) <= {REPRODUCED, NOTHING}:
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return Outcome(verdict, tuple(parts), tuple(decisive))


def finding(*pairs: tuple[Select, Select]) -> Judge:
    """A comparison of ours with no paper verdict: ``b - a`` for each pair whose runs exist.

    A pair whose two conditions find the same run (the digits race's main analytic runs are its
    exact ones) is no comparison: its first run, the control, counts as missing; a pair of runs
    found by two pairs of conditions is compared once.
    """

    def judge(runs: Runs) -> Outcome:
        found = [(runs.one(a), runs.one(b)) for a, b in pairs]
        distinct: list[tuple[Arm, Arm]] = []
        for a, b in found:  # each pair of runs once, whichever conditions found it
            if a is None or b is None or a is b:
                continue
            if not any(a is x and b is y for x, y in distinct):
                distinct.append((a, b))
        diffs = tuple(compare(a, b) for a, b in distinct)
        if not diffs:
            absent = {s.name for pair in pairs for s in pair if runs.one(s) is None}
            same = {a.name for (a, _), (x, y) in zip(pairs, found, strict=True) if x is y}
            raise _Missing(sorted(absent | same))
        return Outcome(FINDING, diffs, diffs)

    return judge


def _judge_baselines(runs: Runs) -> Outcome:
    """The best strength of each baseline grid against Dropout_1 and the analytic replacement."""
    one = _needs_reference(runs)
    chosen = [b for b in (runs.best(RDROP), runs.best(FRATERNAL)) if b is not None]
    if not chosen:
        raise _Missing(("rdrop-* or fraternal-*",))
    analytic = runs.one(ANALYTIC)
    diffs = [compare(one, b) for b in chosen]
    diffs += [compare(b, analytic) for b in chosen if analytic is not None]
    return Outcome(
        FINDING, ("grid strengths chosen by mean on the same seeds", *diffs), tuple(diffs)
    )


def _judge_q(runs: Runs) -> Outcome:
    """Dropout_8 - Dropout_1 at another q and at the suite's q."""
    one = _needs_reference(runs)
    other = runs.by_k(OTHER_Q)
    if len(other) < 2:
        raise _Missing(("q0.2-dropout-8",))
    main = runs.by_k(DROPOUT, one)
    diffs = []
    for ks in (other, main):
        if 1 in ks and len(ks) > 1:
            diffs.append(compare(ks[1], ks[max(ks)]))
    return Outcome(FINDING, tuple(diffs), tuple(diffs))


def _judge_budget(runs: Runs) -> Outcome:
    """Dropout_4 and Dropout_8 against Dropout_1 with a longer budget and the suite's."""
    one = _needs_reference(runs)
    longer = runs.by_k(LONGER)
    main = runs.by_k(DROPOUT, one)
    diffs = []
    for ks in (longer, main):
        if 1 in ks:
            diffs += [compare(ks[1], ks[k]) for k in (4, 8) if k in ks]
    return Outcome(FINDING, tuple(diffs), tuple(diffs))


_A_TESTS = (
    "Dropout_K - Dropout_1 (K: the largest k with two or more seeds). Reproduced: clearly above "
    "0 and no step from one k to the next below 0 (clearly, or untested with one seed). Not "
    "reproduced: clearly below 0, equivalent to 0, or a step clearly below 0. Otherwise "
    "inconclusive."
)
_NOISE_TESTS = (
    "Needs a gap: Dropout_{k} - Dropout_1 clearly above 0 (else inconclusive). Reproduced: the "
    "noise clearly helps (noised - Dropout_{k} clearly below 0) and leaves no clear gap (noised "
    "- Dropout_1 not clearly above 0). Not reproduced: noised - Dropout_1 clearly above 0 (all "
    "or part of the gap left). Otherwise inconclusive."
)

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "a",
        "Best validation perplexity gets worse monotonically with k (Dropout_k, k = 1, 2, 4, 8).",
        "PTB: worse as k grows; Dropout_32 still beats no dropout (~120 best val ppl). "
        "[G]: Dropout_1 83.0, Dropout_4 89.2, Dropout_8 91.6, no reg 118.6",
        _A_TESTS,
        _judge_a,
        shows=(DROPOUT_K, "dropout-[0-9][0-9]", "no-dropout"),
    ),
    Claim(
        "b",
        "Dropout_4 + sqrt(3/4) two-sample difference noise is within noise of Dropout_1.",
        "Dropout_4 + xi~ back to Dropout_1 (qualitative)",
        _NOISE_TESTS.format(k=4),
        _judge_b,
        needs=(DIFFERENCE,),
        shows=("dropout-1", "dropout-4", "dropout-4-difference"),
    ),
    Claim(
        "c",
        "Clean loss + R_approx (explicit only) beats the largest-k Dropout_k but trails Dropout_1.",
        "R_approx beats Dropout_32, trails Dropout_1 (qualitative). [G]: explicit only 87.0 "
        "vs Dropout_1 83.0, Dropout_8 91.6",
        "Reproduced: explicit - Dropout_K clearly below 0 and explicit - Dropout_1 clearly above "
        "0. Not reproduced: either clearly of the other sign. Otherwise inconclusive.",
        _judge_c,
        shows=(DROPOUT_K, "explicit", "no-dropout"),
    ),
    Claim(
        "d",
        "R_approx + xi_approx (the analytic replacement) comes close to Dropout_1.",
        "R_approx + xi_approx matches dropout (qualitative). [G]: 77.4 vs Dropout_1 83.0",
        f"analytic - Dropout_1. *Matches* (the paper's claim): the interval within "
        f"±{MARGIN_TEXT} of Dropout_1. *Better* / *worse*: the interval below / "
        "above 0 and beyond that margin. Otherwise inconclusive.",
        _judge_d,
        needs=(ANALYTIC,),
        shows=("dropout-1", "analytic", "no-dropout"),
    ),
    Claim(
        "e",
        "Identity H_out, tuned, is about as good as the best l2 and worse than R_approx.",
        "PTB (slides): identity H 108.76, l2 112.04, R-tilde 84.06, R_approx 84.52",
        "Best identity - best l2 and best identity - R_approx. Reproduced: the first equivalent "
        f"(interval within ±{MARGIN_TEXT} of the l2 run) and the second clearly above "
        "0. Not reproduced: identity - R_approx clearly below 0, or identity - l2 clear and "
        "beyond the margin. Otherwise inconclusive.",
        _judge_e,
        shows=("dropout-1", "explicit", "identity-*", "l2-*", "label-*"),
    ),
    Claim(
        "f",
        "With more data the Dropout_k - Dropout_1 gap shrinks.",
        "WT103: Dropout_1 34.24, Dropout_2 33.35, Dropout_4 32.74, Dropout_8 32.78 "
        "(no implicit effect with much data)",
        "Per seed, the gap (Dropout_k - Dropout_1) / Dropout_1 in % at each training size (k: "
        "the largest k run at every size; at a size other than the main one, the runs of the "
        "longest budget with both Dropout_1 and Dropout_k). Reproduced: the gap at the smallest "
        "size clearly above 0 and the gap at the largest size minus the gap at the smallest "
        "clearly below 0. "
        "Not reproduced: that change clearly above 0. Otherwise (no clear gap at the smallest "
        "size included) inconclusive.",
        _judge_f,
        shows=("data-*", DROPOUT_K),
    ),
    Claim(
        "Fig. 4",
        "Dropout_k + sqrt(1 - 1/k) xi_approx tracks Dropout_1.",
        "tracks Dropout_1 (qualitative). [G]: Dropout_8 + implicit 83.1 vs Dropout_1 83.0",
        "For each k with a noised run, as (b). Not reproduced: some k not reproduced. "
        "Reproduced: every k with a clear gap reproduced. Otherwise inconclusive.",
        _judge_fig4,
        shows=("dropout-1", DROPOUT_K, "dropout-*-analytic"),
    ),
    Claim(
        "grouping",
        "(ours) Per-element squares (the original code) against the mask grouping rule.",
        "the original code squares per element",
        "No verdict: the differences as measured.",
        finding((EXPLICIT, EXPLICIT_ELEMENT), (ANALYTIC, ANALYTIC_ELEMENT)),
        one_seed_rule=False,
        shows=("explicit", "explicit-element", "analytic", "analytic-element"),
    ),
    Claim(
        "estimator",
        "(ours) Gradient estimators of the analytic step: HVP differences (the main "
        "runs) against exact double backward (`-exact`) and finite differences (`-fd`).",
        "-",
        "No verdict: the differences as measured.",
        finding(
            (ANALYTIC_EXACT, ANALYTIC),
            (ANALYTIC_EXACT, ANALYTIC_FD),
            (ANALYTIC, ANALYTIC_FD),
            (EXPLICIT, EXPLICIT_FD),
        ),
        one_seed_rule=False,
        shows=("analytic", "analytic-exact", "analytic-fd", "explicit", "explicit-fd"),
    ),
    Claim(
        "noise",
        "(ours) Does the analytic noise xi_approx help on top of R_approx? The implicit effect "
        "measured by its replacement: R_approx + xi_approx against R_approx alone.",
        "xi_approx is needed to match dropout (R_approx alone trails Dropout_1)",
        "No verdict: the difference as measured (below 0: the noise helps).",
        finding((EXPLICIT, ANALYTIC)),
        needs=(EXPLICIT, ANALYTIC),
        one_seed_rule=False,
        shows=("dropout-1", "explicit", "analytic"),
    ),
    Claim(
        "q",
        "(ours) Is (a) about the architecture or about q? Dropout_8 - Dropout_1 on the LSTM at "
        "q = 0.2 (the QRNN's and Transformer's q) and at the suite's q.",
        "-",
        "No verdict: the differences as measured.",
        _judge_q,
        needs=(OTHER_Q.named("q0.2-dropout-1") + {"method.k": 1},),
        one_seed_rule=False,
        shows=("dropout-1", "dropout-8", "q0.2-dropout-*"),
    ),
    Claim(
        "budget",
        "(ours) Is (a) a budget artefact? Dropout_4 and Dropout_8 against Dropout_1 with 500 "
        "epochs (`e500-*`, same patience) and with the suite's budget.",
        "-",
        "No verdict: the differences as measured.",
        _judge_budget,
        needs=(
            LONGER.named("e500-dropout-1") + {"method.k": 1},
            LONGER.named("e500-dropout-4") + {"method.k": 4},
        ),
        one_seed_rule=False,
        shows=("dropout-1", "dropout-4", "dropout-8", "e500-dropout-*"),
    ),
    Claim(
        "baselines",
        "(ours) R-Drop and fraternal dropout (the best strength of each grid) against Dropout_1 "
        "and against R_approx + xi_approx.",
        "-",
        "No verdict: the differences as measured.",
        _judge_baselines,
        one_seed_rule=False,
        shows=("dropout-1", "rdrop-*", "fraternal-*", "analytic"),
    ),
)


def judge_claims(
    runs: Runs | Mapping[str, Arm], claims: tuple[Claim, ...] = CLAIMS
) -> list[Verdict]:
    """One :class:`Verdict` per claim, in order.

    Args:
        runs: The report's runs (or an :class:`Arm` per run name, Dropout_1 named ``dropout-1``).
        claims: The claims to judge.
    """
    if not isinstance(runs, Runs):
        runs = Runs(runs)
    out = []
    for claim in claims:
        absent = [s.name for s in claim.needs if runs.one(s) is None]
        try:
            if absent:
                raise _Missing(absent)
            outcome = claim.judge(runs)
        except _Missing as missing:
            out.append(Verdict(claim.key, NOT_RUN, (f"missing runs: {', '.join(missing.names)}",)))
            continue
        verdict = outcome.verdict
        one_seed = any(not d.tested for d in outcome.decisive)
        if claim.one_seed_rule and one_seed and verdict not in (NOT_RUN, FINDING):
            verdict = ONE_SEED
        out.append(Verdict(claim.key, verdict, outcome.parts, outcome.decisive))
    return out


def longer_budgets(arms: Mapping[str, Arm]) -> list[tuple[int, Runs]]:
    """The report's runs at each budget longer than Dropout_1's, judged as a suite of their own.

    A longer budget counts when a Dropout_1 (``method.k = 1``, Dropout_1's setting) was trained
    with more epochs and some other run was trained with those epochs too: the runs with those
    epochs, with that Dropout_1 as the reference, so every claim compares runs of one budget: a
    verdict that rests on runs still improving at the suite's budget is judged again where they
    had longer.

    Returns:
        ``(epochs, runs)`` per longer budget, shortest first.
    """
    main = arms.get("dropout-1")
    if main is None:
        return []
    epochs = config_value(main.config, "train.epochs")
    out = []
    references = [
        a
        for a in arms.values()
        if DROPOUT.matches(a.config, main.config)
        and config_value(a.config, "method.k") == 1
        and same_setting(a.config, main.config)
        and (config_value(a.config, "train.epochs") or 0) > (epochs or 0)
    ]
    for longer in sorted({config_value(a.config, "train.epochs") for a in references}):
        at = {n: a for n, a in arms.items() if config_value(a.config, "train.epochs") == longer}
        reference = min(n for n in at if n in {a.name for a in references})
        if len(at) > 1:
            out.append((longer, Runs(at, reference)))
    return out


def code_version_text(runs: Iterable[Any]) -> str:
    """The report's sentence on the commits its runs record (:func:`code_of`)."""
    codes = [code_of(r.summary) for r in runs]
    recorded = sum(1 for _, complete in codes if complete)
    versions = sorted({v for known, _ in codes for v in known})
    if not versions:
        return (
            f"Code versions: none of the {len(codes)} run summaries records the commit that "
            "trained it (they predate that record), so whether a comparison mixes code "
            "versions is *unknown*, and it is not flagged as mixed."
        )
    return (
        f"Code versions: {recorded} of {len(codes)} run summaries record the code that trained "
        f"them ({len(versions)} distinct: {', '.join(_short(v) for v in versions)}; a commit "
        f"that records its numerics version is that version); a comparison between different "
        f"versions (or a dirty checkout) is marked {MIXED}, one resting on seeds without a "
        "record says *code versions partly unrecorded* (not mixed: unknown)."
    )


def _short(version: str) -> str:
    """A version as the reports print it: ``numerics 1``, or a commit's first 10 hex digits."""
    if version.startswith("numerics"):
        return version
    commit, plus, dirty = version.partition("+")
    return commit[:10] + plus + dirty
