"""The verdict rules (issue 29): paired t intervals and Welch's test from scipy.stats, sign-aware
claims, the one-seed rule, budget-limited runs, code versions, runs selected by their config."""

import json
import random
from pathlib import Path

import pytest
from scipy import stats
from suite_configs import config_for

from dropsplit.experiments.claims import (
    BASE_SEED,
    Arm,
    Claim,
    Select,
    budget_limited,
    budget_used,
    code_of,
    compare,
    finding,
    judge_claims,
)
from dropsplit.experiments.report import Run, write_report


def _arm(name, values, *extra, seeds=None, **kwargs):
    seeds = seeds or [BASE_SEED + i for i in range(len(values))]
    return Arm(name, config_for(name, *extra), dict(zip(seeds, values, strict=True)), **kwargs)


def _arms(noise=1.0, **means):
    """Three seeds per run, at ``mean`` plus a noise of its own (or the values given).

    The noise is drawn per run name, so paired differences have a spread (a zero spread would be
    a zero-width interval).
    """
    out = {}
    for key, v in means.items():
        name = key.replace("_", "-")
        if not isinstance(v, list):
            draw = random.Random(name)
            v = [v + noise * draw.uniform(-1, 1) for _ in range(3)]
        out[name] = _arm(name, v)
    return out


def _verdict(arms, claim):
    return next(v for v in judge_claims(arms) if v.claim == claim)


def test_paired_interval_is_scipys_t_interval_on_the_seed_differences():
    a, b = [5.0, 5.1, 5.05], [5.1, 5.15, 5.2]
    d = compare(_arm("dropout-1", a), _arm("dropout-8", b))
    reference = stats.ttest_rel(b, a)
    interval = reference.confidence_interval(0.95)
    assert d.test == "paired" and d.n == (3, 3, 3)
    assert (d.low, d.high, d.p) == pytest.approx((interval.low, interval.high, reference.pvalue))
    assert d.diff == pytest.approx(0.1)


def test_a_clear_two_standard_error_gap_whose_paired_t_interval_includes_0():
    """The old rule: |0.10| > 2 s.e. = 0.082 (unpaired, seed sd 0.05): "clear". The paired
    differences 0.10, 0.05, 0.15 give t(2) = 3.46: the 95 % interval [-0.02, +0.22] includes 0."""
    arms = {
        "dropout-1": _arm("dropout-1", [5.0, 5.1, 5.05]),
        "dropout-8": _arm("dropout-8", [5.1, 5.15, 5.2]),
    }
    d = compare(arms["dropout-1"], arms["dropout-8"])
    old_se = (0.05**2 / 3 + 0.05**2 / 3) ** 0.5
    assert abs(d.diff) > 2 * old_se  # "clear" by the old rule
    assert d.low < 0 < d.high and not d.clear
    assert d.value() == "+0.10 [-0.02, +0.22], p = 0.074 (paired n = 3)"
    v = _verdict(arms, "a")
    assert v.verdict == "inconclusive"  # was "reproduced"


def test_seeds_not_shared_are_compared_by_welchs_test():
    a = _arm("dropout-1", [5.0, 5.1, 5.05], seeds=[1, 2, 3])
    b = _arm("dropout-8", [5.3, 5.5], seeds=[4, 5])
    d = compare(a, b)
    reference = stats.ttest_ind([5.3, 5.5], [5.0, 5.1, 5.05], equal_var=False)
    interval = reference.confidence_interval(0.95)
    assert d.test == "Welch" and d.n == (0, 3, 2)
    assert (d.low, d.high, d.p) == pytest.approx((interval.low, interval.high, reference.pvalue))
    assert "(Welch n = 3 and 2)" in d.value()


def test_verdict_dropout_k_monotone_worsening():
    assert _verdict(_arms(dropout_1=100, dropout_2=103, dropout_4=106), "a").verdict == (
        "reproduced"
    )
    assert _verdict(_arms(dropout_1=100, dropout_2=99, dropout_4=95), "a").verdict == (
        "not reproduced"
    )
    # no effect: the interval within ±2 % of Dropout_1 (no effect of consequence)
    no_effect = _arms(0.3, dropout_1=100, dropout_2=100.5, dropout_4=100.2)
    assert _verdict(no_effect, "a").verdict == "not reproduced"
    # ... and an interval too wide to say either: inconclusive
    wide = _arms(3.0, dropout_1=100, dropout_2=100.5, dropout_4=100.2)
    assert _verdict(wide, "a").verdict == "inconclusive"
    # a one-seed Dropout_8 beside three-seed runs: the verdict rests on Dropout_4 ...
    added = _arms(dropout_1=100, dropout_4=106, dropout_8=[108.0])
    assert _verdict(added, "a").verdict == "reproduced"
    assert "dropout-4 - dropout-1 = +6." in _verdict(added, "a").effect
    assert "explicit - dropout-4" in _verdict({**added, **_arms(explicit=103)}, "c").effect
    # ... but a step down to it, which one seed cannot test, leaves it inconclusive
    reversal = _arms(dropout_1=100, dropout_4=106, dropout_8=[90.0])
    v = _verdict(reversal, "a")
    assert v.verdict == "inconclusive (1 seed)"
    assert "dropout-8 - dropout-4 = -1" in v.effect and "(1 seed: no test)" in v.effect


def test_one_seed_verdicts_are_at_most_inconclusive():
    v = _verdict(_arms(dropout_1=[100.0], analytic=[120.0]), "d")
    assert v.verdict == "inconclusive (1 seed)"
    assert v.effect.startswith("analytic - dropout-1 = +20.00 (1 seed: no test)")
    one_seed = _arms(dropout_1=[100.0], dropout_4=[110.0])
    assert _verdict(one_seed, "a").verdict == "inconclusive (1 seed)"


def test_b_is_sign_aware_a_gap_of_the_wrong_sign_recovers_nothing():
    """Dropout_4 clearly *better* than Dropout_1: the old rule (|gap| clear, the noised run not
    clearly worse) said "reproduced"; there is no gap for the noise to bring back."""
    arms = _arms(0.3, dropout_1=100, dropout_4=94, dropout_4_difference=100.5)
    gap = compare(arms["dropout-1"], arms["dropout-4"])
    assert gap.below  # a clear gap, of the wrong sign
    v = _verdict(arms, "b")
    assert v.verdict == "inconclusive"
    assert "a gap of the wrong sign: nothing to recover" in v.effect
    assert "recovers" not in v.effect


def test_verdict_difference_noise_and_explicit_and_replacement():
    arms = _arms(
        dropout_1=100,
        dropout_4=106,
        dropout_4_difference=100.5,
        dropout_8=110,
        explicit=104,
        analytic=100.3,
    )
    assert _verdict(arms, "b").verdict == "reproduced"
    assert "the noise recovers" in _verdict(arms, "b").effect
    assert _verdict(arms, "c").verdict == "reproduced"
    assert _verdict(arms, "d").verdict == "inconclusive"  # noise 1 on 100: not within ±2
    arms = _arms(
        dropout_1=100,
        dropout_4=106,
        dropout_4_difference=106,
        dropout_8=110,
        explicit=112,
        analytic=110,
    )
    assert _verdict(arms, "b").verdict == "not reproduced"
    assert _verdict(arms, "c").verdict == "not reproduced"
    assert _verdict(arms, "d").verdict == "worse"
    assert _verdict(_arms(dropout_1=100), "b").verdict == "not run"


@pytest.mark.parametrize(
    "analytic, verdict",
    [(100.2, "matches"), (90.0, "better"), (110.0, "worse"), (101.5, "inconclusive")],
)
def test_d_tells_matches_from_better_and_worse(analytic, verdict):
    """Matches: the interval within ±2 % of Dropout_1 (±2 at 100); better / worse: beyond it."""
    arms = _arms(0.3 if verdict != "inconclusive" else 1.5, dropout_1=100, analytic=analytic)
    assert _verdict(arms, "d").verdict == verdict


def test_e_uses_the_same_test_identity_like_l2_and_worse_than_r_approx():
    arms = _arms(0.3, dropout_1=100, explicit=95, identity_x1=104, l2_1e_5=104.2, l2_1e_4=110)
    v = _verdict(arms, "e")
    assert v.verdict == "reproduced"
    assert "best l2 l2-1e-5" in v.effect  # the better strength of the grid
    # identity clearly better than the best l2, beyond the margin: not "about as good"
    arms = _arms(0.3, dropout_1=100, explicit=95, identity_x1=101, l2_1e_5=106)
    assert _verdict(arms, "e").verdict == "not reproduced"


def test_verdict_data_size_tests_the_change_of_the_relative_gap():
    arms = _arms(0.3, dropout_1=100, dropout_4=106)
    arms.update(_arms(0.3, **{"data_0.0025_dropout_1": 120, "data_0.0025_dropout_4": 132}))
    arms.update(_arms(0.3, **{"data_0.02_dropout_1": 90, "data_0.02_dropout_4": 90.5}))
    v = _verdict(arms, "f")
    assert v.verdict == "reproduced"
    assert "fraction 0.005: dropout-4 - dropout-1" in v.effect
    assert "gap (%) at 0.02 - gap (%) at 0.0025 = -9." in v.effect  # 0.6 % - 10 %
    # no clear gap at the smallest size: nothing to shrink
    arms.update(_arms(0.3, **{"data_0.0025_dropout_4": 120.1}))
    assert _verdict(arms, "f").verdict == "inconclusive"


def test_data_size_compares_an_extended_size_at_its_longest_budget_with_both_runs():
    arms = _arms(0.3, dropout_1=100, dropout_4=106)
    arms.update(_arms(0.3, **{"data_0.0025_dropout_1": 120, "data_0.0025_dropout_4": 132}))
    arms.update(_arms(0.3, **{"data_0.02_dropout_1": 90, "data_0.02_dropout_4": 90.5}))
    # only Dropout_1 trained longer: no pair at 500 epochs, the 10-epoch pair stays
    arms.update(_arms(0.3, **{"data_0.02_e500_dropout_1": 85}))
    v = _verdict(arms, "f")
    assert "fraction 0.02: data-0.02-dropout-4 - data-0.02-dropout-1 = +" in v.effect
    # both trained longer: the longer pair is the size's comparison
    arms.update(_arms(0.3, **{"data_0.02_e500_dropout_4": 80}))
    v = _verdict(arms, "f")
    assert "fraction 0.02: data-0.02-e500-dropout-4 - data-0.02-e500-dropout-1 = -5." in v.effect
    assert v.verdict == "reproduced"  # gap 10 % at 0.0025, -6 % at 0.02


def test_fig4_is_judged_as_b_for_each_k():
    arms = _arms(0.3, dropout_1=100, dropout_4=106, dropout_4_analytic=100.5, dropout_8=110)
    v = _verdict(arms, "Fig. 4")
    assert v.verdict == "reproduced"
    assert v.effect.startswith("k=4 (reproduced): dropout-4-analytic - dropout-1 = +")
    arms.update(_arms(0.3, dropout_8_analytic=109.5))
    v = _verdict(arms, "Fig. 4")
    assert v.verdict == "not reproduced" and "k=8 (not reproduced)" in v.effect
    no_k = _arms(dropout_1=100, dropout_2_analytic=[100.5])
    v = _verdict(no_k, "Fig. 4")
    assert v.verdict == "inconclusive (1 seed)" and "recovers" not in v.effect
    assert _verdict(_arms(dropout_1=100), "Fig. 4").verdict == "not run"


def test_runs_are_selected_by_their_config_not_their_name():
    """A replacement run under another name is found; a run called analytic that is not one is
    not."""
    arms = _arms(0.3, dropout_1=100)
    arms["my-replacement"] = Arm("my-replacement", config_for("analytic"), {1111: 90.0, 1112: 91})
    v = _verdict(arms, "d")
    assert v.verdict == "better" and "my-replacement - dropout-1" in v.effect
    impostor = _arms(0.3, dropout_1=100)
    impostor["analytic"] = Arm("analytic", config_for("dropout-2"), {1111: 90.0, 1112: 91})
    assert _verdict(impostor, "d").verdict == "not run"
    # another training fraction or budget is not the main setting
    other = _arms(0.3, dropout_1=100)
    other["analytic"] = Arm(
        "analytic", config_for("analytic", "data.train_fraction=0.01"), {1111: 90.0, 1112: 91}
    )
    assert _verdict(other, "d").verdict == "not run"


def test_estimator_finding_compares_each_estimator_with_the_main_runs():
    arms = _arms(analytic_exact=99, analytic=100, analytic_fd=110, explicit=104, explicit_fd=115)
    v = _verdict(arms, "estimator")
    assert v.verdict == "finding"
    parts = v.effect.split("; ")
    assert [p.split(" = ")[0] for p in parts] == [
        "analytic - analytic-exact",
        "analytic-fd - analytic-exact",
        "analytic-fd - analytic",
        "explicit-fd - explicit",
    ]
    missing = _verdict(_arms(dropout_1=100, analytic_fd=110), "estimator")
    assert missing.verdict == "not run"
    assert missing.effect == "missing runs: analytic, analytic-exact, explicit, explicit-fd"


def test_a_suite_whose_main_analytic_runs_are_exact_is_judged_on_them():
    """The digits race trains R_approx (+ xi_approx) by double backward (HVP differences are
    wrong on ReLU networks): (c) and (d) judge those runs, finite differences stay a control, and
    the estimator row does not compare the exact runs with themselves."""
    exact = ('method.gradient="double-backward"',)
    arms = _arms(0.3, dropout_1=100, dropout_8=110)
    arms["analytic"] = _arm("analytic", [90.0, 91.0, 90.5], *exact)
    arms["explicit"] = _arm("explicit", [105.0, 104.0, 104.5], *exact)
    d = _verdict(arms, "d")
    assert d.verdict == "better" and "analytic - dropout-1" in d.effect
    assert _verdict(arms, "c").verdict == "reproduced"
    estimator = _verdict(arms, "estimator")
    assert estimator.verdict == "not run"
    assert estimator.effect == "missing runs: analytic-exact, analytic-fd, explicit-fd"
    # with a finite-difference control, the exact main runs are compared with it once
    arms["analytic-fd"] = _arm("analytic-fd", [95.0, 96.0, 94.0])
    effect = _verdict(arms, "estimator").effect
    assert effect.startswith("analytic-fd - analytic = ") and effect.count("analytic-fd -") == 1
    fd_only = _arms(0.3, dropout_1=100)
    fd_only["analytic"] = _arm(
        "analytic", [90.0, 91.0, 90.5], 'method.gradient="finite-difference"'
    )
    assert _verdict(fd_only, "d").verdict == "not run"


def test_a_new_claim_is_an_entry_not_a_branch():
    """A claim on another architecture is one Claim: its selections, its judge."""
    qrnn = Select("qrnn-dropout-1", (("model.name", "qrnn"), ("method.name", "dropout")))
    replacement = Select("qrnn-analytic", (("model.name", "qrnn"), ("method.name", "analytic")))
    claim = Claim(
        "qrnn-d", "QRNN: the analytic replacement beats Dropout_1.", "-", "b - a",
        finding((qrnn, replacement)), needs=(qrnn, replacement),
    )  # fmt: skip
    one = Arm("q1", config_for("dropout-1", 'model.name="qrnn"'), {1111: 5.0, 1112: 5.1})
    (missing,) = judge_claims({"q1": one}, claims=(claim,))
    assert missing.verdict == "not run" and missing.effect == "missing runs: qrnn-analytic"
    two = Arm("q2", config_for("analytic", 'model.name="qrnn"'), {1111: 4.0, 1112: 4.2})
    (found,) = judge_claims({"q1": one, "q2": two}, claims=(claim,))
    assert found.verdict == "finding"
    # differences -1.0 and -0.9: mean -0.95, s.e. 0.05, t(1) = 12.7
    assert found.effect == "q2 - q1 = -0.95 [-1.59, -0.31], p = 0.033 (paired n = 2)"


def test_budget_used_is_the_best_evaluations_share_of_the_epochs_or_steps():
    metrics = [{"epoch": e, "step": 10 * e, "val_ppl": 10.0 - min(e, 46)} for e in (10, 45, 46)]
    summary = {"config": {"train": {"epochs": 50, "max_steps": 0}}}
    assert budget_used(summary, metrics) == pytest.approx(46 / 50)
    assert budget_limited(summary, metrics)  # 46 of 50 epochs: in the last 10 %
    assert not budget_limited(summary, metrics[:2])  # 45 of 50: not
    steps = {"config": {"train": {"epochs": 1000, "max_steps": 470}}}
    assert budget_used(steps, metrics) == pytest.approx(460 / 470)  # the step cap binds
    assert budget_used({"config": {}}, metrics) is None


def _write(root, name, seed, ppl, best_epoch, epochs=10, commit=None):
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": name, "group": "dropout-k", "seed": seed}))
    config = config_for(name, f"train.epochs={epochs}", f"train.seed={BASE_SEED + seed}")
    summary = {"best_val_ppl": ppl, "test_ppl": ppl, "epochs": epochs, "train_seconds": 60.0}
    summary |= {"seconds_per_step": 0.1, "config": config}
    if commit:
        summary["commit"] = commit
    (d / "summary.json").write_text(json.dumps(summary))
    lines = [
        {"step": 10 * e, "epoch": e, "seconds": 6.0 * e, "val_ppl": ppl + (e != best_epoch)}
        for e in range(1, epochs + 1)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return d


def test_a_budget_limited_run_is_marked_in_the_tables_and_its_verdict(tmp_path):
    """Two Dropout_8 seeds peak at their last epoch (10 of 10; the third at 8): † in the run
    table, in (a)'s effect and its verdict."""
    dirs = []
    for seed, (one, eight) in enumerate([(5.0, 5.3), (5.1, 5.45), (5.05, 5.35)]):
        dirs.append(_write(tmp_path / "in", "dropout-1", seed, one, best_epoch=5))
        dirs.append(_write(tmp_path / "in", "dropout-8", seed, eight, (10, 10, 8)[seed]))
    text = write_report(dirs, tmp_path / "report").read_text()
    assert "| dropout-k | dropout-8† | 3 |" in text and "| 0.100 | 2 |" in text  # 2 of 3 seeds
    assert "| dropout-k | dropout-1 | 3 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| (a) "))
    assert row.endswith("| **reproduced†** |")
    assert "dropout-8† - dropout-1 = +0.32 [+0.24, +0.39], p = 0.0028 (paired n = 3)" in row
    assert "† rests on budget-limited runs: dropout-8 (2 of 3 seeds)" in row
    assert "none of the 6 run summaries records the commit" in text  # unknown, not mixed
    csv = (tmp_path / "report" / "summary.csv").read_text().splitlines()
    assert csv[0].endswith(",budget_limited_seeds") and csv[2].endswith(",2")


def test_commits_of_one_numerics_version_compare_as_one_and_of_two_are_mixed(tmp_path):
    def run(name, seed, ppl, commit, numerics):
        d = _write(tmp_path / "in", name, seed, ppl, 5)
        summary = json.loads((d / "summary.json").read_text())
        summary |= {"git": {"commit": commit, "dirty": False, "numerics": numerics}}
        (d / "summary.json").write_text(json.dumps(summary | {"resumed": []}))
        return d

    pairs = [(5.0, 5.3), (5.1, 5.45), (5.05, 5.35)]
    one = [run("dropout-1", i, a, "aaaa", 1) for i, (a, _) in enumerate(pairs)]
    one += [run("dropout-8", i, b, "bbbb", 1) for i, (_, b) in enumerate(pairs)]
    text = write_report(one, tmp_path / "one").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| (a) "))
    assert row.endswith("| **reproduced** |") and "‡" not in row
    assert "record the code that trained them (1 distinct: numerics 1;" in text
    retrained = one[-1] / "summary.json"  # one seed retrained by other numerics
    summary = json.loads(retrained.read_text())
    summary["git"] = {"commit": "cccc", "dirty": False, "numerics": 2}
    retrained.write_text(json.dumps(summary))
    text = write_report(one, tmp_path / "two").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| (a) "))
    assert row.endswith("| **reproduced‡** |")
    assert "‡ mixed code versions: numerics 1, numerics 2" in row


def test_comparisons_across_commits_are_flagged_mixed_and_unrecorded_ones_unknown(tmp_path):
    dirs = []
    for seed, (one, eight) in enumerate([(5.0, 5.3), (5.1, 5.45), (5.05, 5.35)]):
        dirs.append(_write(tmp_path / "in", "dropout-1", seed, one, 5, commit="aaaa"))
        commit = "bbbb" if seed == 2 else "aaaa"
        dirs.append(_write(tmp_path / "in", "dropout-8", seed, eight, 5, commit=commit))
    text = write_report(dirs, tmp_path / "report").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| (a) "))
    assert row.endswith("| **reproduced‡** |")
    assert "‡ mixed code versions: aaaa, bbbb" in row
    assert "6 of 6 run summaries record the code that trained them (2 distinct: aaaa, bbbb;" in text
    # one seed without a commit beside recorded ones: unknown, said so, not called mixed
    a = Arm("dropout-1", config_for("dropout-1"), {1: 5.0, 2: 5.1}, (), frozenset({"aaaa"}), 0)
    b = Arm("dropout-8", config_for("dropout-8"), {1: 5.3, 2: 5.5}, (), frozenset({"aaaa"}), 1)
    assert compare(a, b).code == "partly unknown"
    b = Arm("dropout-8", config_for("dropout-8"), {1: 5.3, 2: 5.5}, (), frozenset(), 2)
    a = Arm("dropout-1", config_for("dropout-1"), {1: 5.0, 2: 5.1}, (), frozenset(), 2)
    assert compare(a, b).code == "unknown"


@pytest.mark.parametrize(
    "summary, versions, complete",
    [
        ({}, (), False),
        ({"commit": "abc"}, ("abc",), True),
        ({"git": {"commit": "abc", "dirty": False}, "resumed": []}, ("abc",), True),
        ({"git": {"commit": "abc", "dirty": True}, "resumed": []}, ("abc+dirty",), True),
        (
            {"git": {"commit": "abc", "dirty": False}, "resumed": [{"step": 9, "commit": "def"}]},
            ("abc", "def"),
            True,
        ),
        ({"git": None, "resumed": [{"step": 9, "commit": "def", "dirty": False}]}, ("def",), False),
        # commits that record one numerics version are that one version
        (
            {
                "git": {"commit": "abc", "dirty": False, "numerics": 1},
                "resumed": [{"step": 9, "commit": "def", "dirty": False, "numerics": 1}],
            },
            ("numerics 1",),
            True,
        ),
        (
            {
                "git": {"commit": "abc", "dirty": False, "numerics": 1},
                "resumed": [{"step": 9, "commit": "def", "dirty": False, "numerics": 2}],
            },
            ("numerics 1", "numerics 2"),
            True,
        ),
        # an installed copy (no checkout) still records its numerics version
        ({"git": {"commit": None, "dirty": None, "numerics": 3}}, ("numerics 3",), True),
        # a dirty checkout's numerics are unknown: its commit, marked dirty
        (
            {"git": {"commit": "abc", "dirty": True, "numerics": 1}, "resumed": []},
            ("abc+dirty",),
            True,
        ),
    ],
    ids=[
        "none",
        "commit-key",
        "git",
        "dirty",
        "resumed",
        "started-unknown",
        "one-numerics",
        "two-numerics",
        "installed-numerics",
        "dirty-numerics",
    ],
)
def test_the_code_that_trained_a_run_is_read_from_its_summary(summary, versions, complete):
    assert code_of(summary) == (versions, complete)


def test_practitioners_table_picks_the_best_strength_and_times_the_reach():
    """Synthetic runs: the best R-Drop strength is chosen by its config's grid, reaching
    Dropout_1's mean best is counted in steps and dropout-step equivalents, and a method that
    never reaches it says so."""
    from dropsplit.experiments.practice import first_reaching, practitioner_lines

    def run(name, seed, best, curve):
        metrics = [
            {"step": 100 * (i + 1), "epoch": i + 1, "seconds": 60.0 * (i + 1), "val_ppl": v}
            for i, v in enumerate(curve)
        ]
        config = config_for(name, "train.epochs=10", f"train.seed={BASE_SEED + seed}")
        summary = {"best_val_ppl": best, "test_ppl": best - 0.3, "config": config}
        return Run(name, "g", seed, name, summary, metrics, Path("."))

    groups = {
        "dropout-1": [run("dropout-1", s, b, [7.0, b]) for s, b in ((0, 6.0), (1, 6.2))],
        "rdrop-0.1": [run("rdrop-0.1", 0, 6.3, [7.0, 6.3])],
        "rdrop-0.5": [run("rdrop-0.5", s, 5.5 + s / 20, [6.05, 5.5 + s / 20]) for s in (0, 1)],
        "analytic": [run("analytic", s, 5.0 + s / 10, [6.5, 6.0, 5.0]) for s in (0, 1)],
    }
    assert first_reaching(groups["rdrop-0.1"][0], 6.1) is None
    assert first_reaching(groups["analytic"][0], 6.1) == {"step": 200, "seconds": 120.0}
    lines = practitioner_lines(groups, {"DropoutK(1)": 1.0, "RDrop(0.5)": 2.0})
    table = "\n".join(lines)
    assert "| rdrop-0.5 | 5.53 ± 0.04 (2) |" in table  # the better strength is the row
    assert "| 2.00 | 100 | 200 | 1.0 |" in table  # reaches 6.1 at step 100: 200 dropout steps
    assert "| Dropout_1 | 6.10 ± 0.14 (2) |" in table and "| 200 (1 of 2 seeds) |" in table
    # paired by seed: -0.5 and -0.65; t(1) leaves the interval across 0
    assert "rdrop-0.5 - Dropout_1 = -0.58 [-1.53, +0.38], p = 0.083 (paired n = 2)" in table
    assert "**no clear difference**" in table
    assert "R-Drop: rdrop-0.1: 6.30 (1 seed), rdrop-0.5: 5.53" in table
    assert practitioner_lines({k: v for k, v in groups.items() if "rdrop" not in k}) == []


def test_runs_at_a_longer_budget_are_judged_again_by_themselves(tmp_path):
    """Dropout_1 and R_approx + xi_approx at the suite's 10 epochs and again at 20 (`e20-*`):
    the report's second table judges the 20-epoch runs against the 20-epoch Dropout_1 only."""
    dirs = []
    for seed, (one, analytic, one_20, analytic_20) in enumerate(
        [(5.0, 4.6, 4.8, 4.85), (5.1, 4.7, 4.9, 4.9), (5.05, 4.65, 4.85, 4.9)]
    ):
        dirs.append(_write(tmp_path / "in", "dropout-1", seed, one, 10))
        dirs.append(_write(tmp_path / "in", "analytic", seed, analytic, 5))
        dirs.append(_write(tmp_path / "in", "e20-dropout-1", seed, one_20, 15, epochs=20))
        dirs.append(_write(tmp_path / "in", "e20-analytic", seed, analytic_20, 15, epochs=20))
    text = write_report(dirs, tmp_path / "report").read_text()
    main, _, longer = text.partition("### At 20 epochs")
    assert longer, "no table for the longer budget"
    row = next(line for line in main.splitlines() if line.startswith("| (d) "))
    assert "analytic - dropout-1† = -0.40" in row  # the suite's budget: Dropout_1 best at 10/10
    assert "`dropout-1`" not in longer.split("\n\n")[1]  # the 20-epoch runs only
    assert "with `e20-dropout-1` as Dropout_1" in longer
    row = next(line for line in longer.splitlines() if line.startswith("| (d) "))
    assert "e20-analytic - e20-dropout-1 = +0.03" in row
    assert "e20" not in next(line for line in main.splitlines() if line.startswith("| (a) "))
