"""Time to quality (issue 18): the cost model of lazy / scheduled steps, clean timings, the
report's section and figure."""

import itertools
import math
import statistics
from pathlib import Path

import pytest
from conftest import make_problem

import dropsplit as ds
from dropsplit.experiments.report import Run
from dropsplit.experiments.time_to_quality import (
    FIGURE,
    RATIO_FIGURE,
    TARGETS,
    clean_timing,
    comparable,
    dropout_step_equivalents,
    plot_ratio_curve,
    plot_time_to_quality,
    ratio_curve,
    ratio_curves,
    ratio_lines,
    step_counts,
    step_kind,
    time_to_quality_lines,
)

STEP_KINDS = ("clean", "both", "explicit", "implicit")
COSTS = {
    "DropoutK(1)": 1.0,
    "DropoutK(4) loop": 3.9,
    "NoDropout": 0.9,
    "Analytic(sampled, implicit) HVP": 3.5,
    "Analytic(sampled) HVP": 2.5,
    "Analytic(implicit only) HVP": 1.9,
}


def analytic(**options):
    return {
        "name": "analytic",
        "curvature": "sampled",
        "implicit": True,
        "gradient": "hvp-difference",
        **options,
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"start_step": 3},
        {"explicit_every": 2, "implicit_every": 3},
        {"start_step": 2, "explicit_every": 3, "implicit_every": 2},
        {"start_step": 1, "implicit": False, "explicit_every": 2},
    ],
    ids=["every-step", "scheduled", "lazy", "scheduled-lazy", "explicit-only"],
)
def test_step_kinds_are_the_terms_the_method_takes(options):
    """The report's cost model against the library: which terms each of 8 real steps reports."""
    pb = make_problem("rnn-locked")
    method = ds.Analytic("label", seed=0, **options)
    for step in range(8):
        pb.model.zero_grad(set_to_none=True)
        stats = method.step(pb.model, pb.forward_fn, pb.batch).stats
        kind = step_kind(analytic(**options), step)
        assert ("explicit" in stats) == (kind in ("both", "explicit"))
        assert ("implicit" in stats) == (kind in ("both", "implicit"))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"start_step": 7},
        {"explicit_every": 2, "implicit_every": 3},
        {"start_step": 5, "explicit_every": 4, "implicit_every": 6},
        {"implicit": False, "explicit_every": 3},
        {"curvature": None, "implicit_every": 2},
    ],
    ids=["every-step", "scheduled", "lazy", "scheduled-lazy", "explicit-only", "implicit-only"],
)
def test_counted_step_kinds_are_those_of_each_step(options):
    method = analytic(**options)
    for steps in (0, 1, 4, 5, 12, 37, 60):
        kinds = [step_kind(method, s) for s in range(steps)]
        assert step_counts(method, steps) == {k: kinds.count(k) for k in STEP_KINDS}


def test_dropout_step_equivalents_sum_each_steps_cost():
    config = {"method": analytic(start_step=4, explicit_every=2, implicit_every=2)}
    # steps 0-3 clean, then both at 4, 6, 8 and clean at 5, 7, 9
    assert dropout_step_equivalents(config, 10, COSTS) == pytest.approx(7 * 0.9 + 3 * 3.5)
    config = {"method": analytic(explicit_every=1, implicit_every=2)}
    assert dropout_step_equivalents(config, 4, COSTS) == pytest.approx(2 * 3.5 + 2 * 2.5)
    dropout = {"method": {"name": "dropout", "k": 4, "noise": "none"}}
    assert dropout_step_equivalents(dropout, 10, COSTS) == pytest.approx(39.0)
    assert dropout_step_equivalents(dropout, 10, {"DropoutK(1)": 1.0}) is None
    exact = {"method": analytic(gradient="double-backward")}
    assert dropout_step_equivalents(exact, 10, COSTS) is None


@pytest.mark.parametrize(
    ("summary", "clean"),
    [
        ({"train_seconds": 100.0, "train_cpu_seconds": 97.0, "threads": 1}, True),
        ({"train_seconds": 100.0, "train_cpu_seconds": 90.0, "threads": 1}, False),
        ({"train_seconds": 100.0, "train_cpu_seconds": 190.0, "threads": 2}, False),
        ({"train_seconds": 100.0}, False),
        (
            {"train_seconds": 100.0, "train_cpu_seconds": 50.0, "threads": 16, "device": "cuda"},
            True,
        ),
    ],
    ids=["own-core", "shared-core", "two-threads", "not-recorded", "gpu"],
)
def test_clean_timing(summary, clean):
    assert clean_timing(summary) is clean


def run(name, seed, curve, method, fraction=0.005, cpu_share=1.0, seconds_per_step=0.1):
    """A finished run whose evaluations every 100 steps have validation perplexities ``curve``."""
    metrics = [
        {"step": 100 * (i + 1), "seconds": seconds_per_step * 100 * (i + 1), "val_ppl": v}
        for i, v in enumerate(curve)
    ]
    wall = metrics[-1]["seconds"]
    summary = {
        "config": {"method": method, "data": {"train_fraction": fraction, "path": ""}, "model": {}},
        "best_val_ppl": min(curve),
        "train_seconds": wall,
        "train_cpu_seconds": cpu_share * wall,
        "threads": 1,
        "machine": "test machine",
    }
    return Run(name, "time", seed, name, summary, metrics, Path("."))


DROPOUT = {"name": "dropout", "k": 1, "noise": "none"}


def groups_for_report():
    # Dropout_1: bests 6.0 and 6.2 (target 6.1) at steps 300 and 400 (mean 350, 35 s)
    d1 = [
        run("dropout-1", 0, [8.0, 7.0, 6.0, 6.1], DROPOUT),
        run("dropout-1", 1, [8.0, 7.0, 6.5, 6.2], DROPOUT),
    ]
    # scheduled: clean for 100 steps, then full steps (3.5); reaches 6.1 at step 200
    scheduled = [
        run("sched", s, [7.0, 6.0, 5.5], analytic(start_step=100), seconds_per_step=0.2)
        for s in (0, 1)
    ]
    scheduled[1].metrics[1]["val_ppl"] = 6.3  # seed 1 reaches it only at step 300
    return {
        "dropout-1": d1,
        "sched": scheduled,
        "slow": [run("slow", 0, [7.0, 6.5], analytic(), cpu_share=0.8)],
        "data-size": [run("data-size", 0, [5.0], DROPOUT, fraction=0.01)],
    }


def test_a_key_newer_code_records_is_no_difference_of_setting_but_a_changed_value_is():
    """Summaries saved before a config key existed lack it; a run trained later records its
    default. Only keys both hold (and the defaults of the missing ones) decide."""
    old = run("dropout-1", 0, [7.0, 6.0], DROPOUT)
    old.summary["config"]["model"] = {"hidden_size": 256, "p_input": 0.4}
    old.summary["config"]["data"]["bptt"] = 70

    def newer(run_name, **model):
        r = run(run_name, 0, [6.5, 5.5], analytic())
        r.summary["config"]["model"] = {
            "name": "lstm", "hidden_size": 256, "p_input": 0.4, "heads": 4, **model
        }  # fmt: skip
        r.summary["config"]["data"].update(bptt=70, path="/elsewhere", download=True)
        return r

    groups = {
        "dropout-1": [old],
        "analytic": [newer("analytic")],
        "wider": [newer("wider", hidden_size=512)],
        "lower-q": [newer("lower-q", p_input=0.2)],
        "qrnn": [newer("qrnn", name="qrnn")],
    }
    assert sorted(comparable(groups)) == ["analytic", "dropout-1"]
    assert "## Time to quality" in "\n".join(time_to_quality_lines(groups, COSTS))


def test_the_section_times_each_run_and_states_the_ratio_with_its_spread():
    groups = groups_for_report()
    assert "data-size" not in comparable(groups)
    text = "\n".join(time_to_quality_lines(groups, COSTS, FIGURE))
    assert "data-size" not in text
    # seeds reach 6.1 at steps 200 and 300: 0.9 * 100 + 3.5 * 100 = 440 and 790 equivalents,
    # against Dropout_1's 350 to its own best: 1.257 and 2.257, mean 1.76, sd 0.71
    assert "| sched | 5.50 ± 0.00 (2) | 250 | 615 | 0.8 | 1.00 |" in text
    assert "sched reaches Dropout_1's quality in **1.76 ± 0.71 (2)** x Dropout_1's dropout" in text
    # wall: 40 s and 60 s against 35 s: 1.14 and 1.71
    assert "in wall time: **1.43 ± 0.40 (2)** x Dropout_1's;" in text
    # the contended run is timed in steps but left out of the wall-time column
    assert "| slow | 6.50 (1 seed) | never | never | never | 0.80 |" in text
    assert "Clean timings: 4 runs, on test machine." in text
    assert f"![Time to quality]({FIGURE})" in text


def test_the_figure_draws_one_line_per_seed(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert plot_time_to_quality(groups_for_report(), COSTS, tmp_path) == FIGURE
    assert (tmp_path / FIGURE).exists()
    lines = figures[0].axes[0].get_lines()
    # 2 + 2 + 1 seeds and the target line; the data-size run is left out
    assert len(lines) == 6
    sched = [line for line in lines if line.get_label() == "sched (2)"][0]
    assert list(sched.get_xdata()) == pytest.approx([90.0, 440.0, 790.0])


def _exact_bootstrap(variant, reference):
    """Every resample of both sides, with its probability: the exact bootstrap distribution of
    the ratio of means (``itertools.product``), to check the Monte-Carlo one against."""
    outcomes = []
    for picks_v in itertools.product(variant, repeat=len(variant)):
        for picks_d in itertools.product(reference, repeat=len(reference)):
            outcomes.append(statistics.fmean(picks_v) / statistics.fmean(picks_d))
    return sorted(outcomes)


def test_the_ratio_over_targets_against_hand_counts_and_the_exact_bootstrap():
    """Target +0 % = 6.1 (Dropout_1's mean best): Dropout_1 seeds 300 (reaches 6.0 at 300) and
    400 (its own best 6.2 above the target: its time to its best); sched seeds 440, 790.
    Target +5 % = 6.405: Dropout_1 at 300 (7.0 > 6.405 at 200) and 300 (6.5 > 6.405, then
    6.2 at 400: 400); sched 440 and 440 (6.3 at step 200)."""
    groups = groups_for_report()
    curve = ratio_curve(groups["sched"], groups["dropout-1"], COSTS, choices=3)
    assert [r.target for r in curve] == list(TARGETS)
    first, last = curve[0], curve[-1]
    assert first.ratio == pytest.approx((440 + 790) / (300 + 400))
    assert last.ratio == pytest.approx((440 + 440) / (300 + 400))
    exact = _exact_bootstrap([440.0, 790.0], [300.0, 400.0])
    # 16 equally likely outcomes: the 2.5 % and 97.5 % order statistics are the extremes
    assert (first.low, first.high) == pytest.approx((exact[0], exact[-1]))
    assert first.low_corrected <= first.low and first.high_corrected >= first.high
    assert first.text() == f"1.76 [{exact[0]:.2f}, {exact[-1]:.2f}]"


def test_a_seed_that_never_arrives_makes_the_ratio_never():
    groups = groups_for_report()
    never = [run("never", s, [7.0, 6.8, 6.7], analytic()) for s in (0, 1)]
    curve = ratio_curve(never, groups["dropout-1"], COSTS)
    assert curve[0].text() == "never"
    half = [run("half", 0, [7.0, 6.0], analytic()), run("half", 1, [7.0, 6.8], analytic())]
    first = ratio_curve(half, groups["dropout-1"], COSTS)[0]
    assert first.text() == "never"  # the mean over seeds needs every seed
    assert math.isinf(first.high) and first.low == pytest.approx(2 * 3.5 * 100 / 400)


def test_the_report_section_has_the_ratio_table_and_its_figure(tmp_path):
    groups = groups_for_report()
    curves = ratio_curves(groups, COSTS)
    assert plot_ratio_curve(curves, groups, tmp_path) == RATIO_FIGURE
    assert (tmp_path / RATIO_FIGURE).exists()
    text = "\n".join(ratio_lines(curves, groups, RATIO_FIGURE))
    assert "| run | | +0 % | +1 % | +2 % | +3 % | +4 % | +5 % |" in text
    assert "| sched (2) | 95 % | 1.76 [" in text
    assert "| | 97.5 % | " in text  # Bonferroni over the two analytic variants (sched, slow)
    counts = sorted({len(groups[n]) for n in (*curves, "dropout-1")})
    assert f"with {counts[0]} to {counts[-1]} seeds a side" in text
    assert f"![Ratio over targets]({RATIO_FIGURE})" in text
