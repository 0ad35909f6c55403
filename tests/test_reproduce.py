"""The reproduction suite and its report on the synthetic corpus (verdicts: test_claims.py)."""

import glob
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from dropsplit.cli import main
from dropsplit.experiments.report import write_report
from dropsplit.experiments.reproduce import load_suite, reproduce, run_status, selected
from dropsplit.training.config import load_config

BASE = """
[data]
corpus = "synthetic"
batch_size = 4
eval_batch_size = 4
test_batch_size = 4
bptt = 8
[model]
embedding_size = 6
hidden_size = 8
layers = 1
implementation = "loop"
[method]
gradient = "finite-difference"
[optim]
lr = 5.0
[train]
epochs = 2
max_steps = 8
eval_every = 4
checkpoint_every = 2
max_eval_batches = 3
"""

SUITE = """
base = "base.toml"
seeds = 2
description = "A synthetic test suite."
[quick]
seeds = 1
set = ["train.max_steps=4"]
[[run]]
name = "dropout-1"
group = "dropout-k"
set = ["method.k=1"]
quick = true
[[run]]
name = "dropout-2"
group = "dropout-k"
set = ["method.k=2"]
[[run]]
name = "analytic"
group = "replacement"
set = ['method.name="analytic"']
quick = true
quick_set = ["train.max_steps=3"]
[[run]]
name = "explicit"
group = "explicit"
set = ['method.name="analytic"', "method.implicit=false"]
seeds = 1
"""


@pytest.fixture
def suite_file(tmp_path):
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "base.toml").write_text(BASE)
    (tmp_path / "suite" / "suite.toml").write_text(SUITE)
    return tmp_path / "suite" / "suite.toml"


def test_suite_expands_runs_over_seeds_and_quick_keeps_its_runs(suite_file):
    full = load_suite(suite_file)
    assert [(r.name, r.seed) for r in full.runs] == [
        ("dropout-1", 0),
        ("dropout-2", 0),
        ("analytic", 0),
        ("dropout-1", 1),
        ("dropout-2", 1),
        ("analytic", 1),
        ("explicit", 0),
    ]
    assert full.runs[3].overrides[-1] == "train.seed=1112"
    quick = load_suite(suite_file, quick=True)
    assert [(r.name, r.seed) for r in quick.runs] == [("dropout-1", 0), ("analytic", 0)]
    assert "train.max_steps=4" in quick.runs[0].overrides
    assert quick.runs[1].overrides[-3:-1] == ("train.max_steps=4", "train.max_steps=3")
    assert "train.max_steps=3" not in full.runs[2].overrides
    assert len(load_suite(suite_file, seeds=3).runs) == 12
    moved = load_suite(suite_file, quick=True, overrides=['train.device="cuda"'])
    # every run's own and quick overrides first, then --set, then the seed
    assert moved.runs[1].overrides[-3:] == (
        "train.max_steps=3",
        'train.device="cuda"',
        "train.seed=1111",
    )


def test_first_seed_gives_fresh_seed_indices_per_suite_and_per_run(tmp_path):
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "suite.toml").write_text(
        'base = "base.toml"\nseeds = 2\nfirst_seed = 3\n'
        '[[run]]\nname = "a"\ngroup = "g"\nset = []\n'
        '[[run]]\nname = "b"\ngroup = "g"\nset = []\nfirst_seed = 0\n'
    )
    runs = load_suite(tmp_path / "suite.toml").runs
    assert [(r.name, r.seed, r.overrides[-1]) for r in runs] == [
        ("b", 0, "train.seed=1111"),
        ("b", 1, "train.seed=1112"),
        ("a", 3, "train.seed=1114"),
        ("a", 4, "train.seed=1115"),
    ]
    assert runs[2].directory == "a/seed3"


@pytest.mark.parametrize(
    "text, match",
    [
        ('base = "base.toml"\n[[run]]\nname = "x"\ngroup = "g"\n', "lacks"),
        (
            'base = "base.toml"\nfirst_seed = -1\n[[run]]\nname = "x"\ngroup = "g"\nset = []\n',
            "first_seed",
        ),
        (
            'base = "base.toml"\n[[run]]\nname = "x"\ngroup = "g"\nset = []\n'
            '[[run]]\nname = "x"\ngroup = "g"\nset = []\n',
            "repeats",
        ),
        ('base = "nothere.toml"\n', "base config"),
    ],
    ids=["missing-key", "negative-first-seed", "repeated-name", "missing-base"],
)
def test_bad_suite_files(tmp_path, text, match):
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "suite.toml").write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_suite(tmp_path / "suite.toml")


def test_missing_suite_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="suite file"):
        load_suite(tmp_path / "none.toml")


def test_reproduce_skips_finished_runs_resumes_partial_ones_and_reports_byte_for_byte(
    suite_file, tmp_path
):
    suite = load_suite(suite_file)
    out = tmp_path / "runs"
    done = reproduce(suite, out, only={"dropout-1", "explicit"})
    assert sorted(d.relative_to(out).as_posix() for d in done) == [
        "dropout-1/seed0",
        "dropout-1/seed1",
        "explicit/seed0",
    ]
    finished = (out / "dropout-1" / "seed0" / "summary.json").read_text()
    # a partial run (checkpoint, no summary) resumes; finished runs are not trained again
    (out / "explicit" / "seed0" / "summary.json").unlink()
    assert run_status(out / "explicit" / "seed0") == "partial"
    done = reproduce(suite, out, only={"dropout-1", "explicit"})
    assert run_status(out / "explicit" / "seed0") == "done"
    assert (out / "dropout-1" / "seed0" / "summary.json").read_text() == finished

    report_dir = tmp_path / "report"
    report = write_report(done, report_dir, suite)
    text = report.read_text()
    assert "A synthetic test suite." in text
    assert "| `dropout-2` | 0, 1 | 2 |" in text  # listed as not run
    assert (report_dir / "fig1_dropout_k.png").exists()
    first = {
        p.relative_to(report_dir): p.read_bytes() for p in report_dir.rglob("*") if p.is_file()
    }
    # regenerate from the copies only, in a fresh directory: identical bytes
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    shutil.rmtree(report_dir)
    write_report(sorted((copy / "runs").glob("*/*")), report_dir, suite)
    second = {
        p.relative_to(report_dir): p.read_bytes() for p in report_dir.rglob("*") if p.is_file()
    }
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_parallel_jobs_train_the_same_runs(suite_file, tmp_path):
    torch.set_default_dtype(torch.float32)  # as in the spawned workers (the fixture restores it)
    suite = load_suite(suite_file)
    only = {"dropout-1", "analytic"}
    serial = reproduce(suite, tmp_path / "a", only=only)
    parallel = reproduce(suite, tmp_path / "b", only=only, jobs=2)
    names = [d.relative_to(tmp_path / "a") for d in serial]
    assert names == [d.relative_to(tmp_path / "b") for d in parallel] and len(names) == 4
    for name in names:
        a, b = (json.loads((tmp_path / r / name / "summary.json").read_text()) for r in "ab")
        assert a["steps"] == b["steps"]
        assert b["best_val_loss"] == pytest.approx(a["best_val_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="jobs"):
        reproduce(suite, tmp_path / "c", jobs=0)


def test_cli_reproduce_quick_prints_the_report(suite_file, tmp_path, capsys):
    out = tmp_path / "quick"
    code = main(["reproduce", "--quick", "--suite", str(suite_file), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "REDUCED" in printed
    assert f"Report: {out / 'report' / 'REPORT.md'}" in printed
    summary = json.loads((out / "dropout-1" / "seed0" / "summary.json").read_text())
    assert summary["steps"] == 4
    assert (out / "dropout-1" / "seed0" / "measure" / "measure.json").exists()
    assert "Explicit gap per site" in (out / "report" / "REPORT.md").read_text()
    code = main(["report", *map(str, sorted(out.glob("*/seed*"))), "--out", str(tmp_path / "r")])
    assert code == 0
    # the command the report prints regenerates it from its own copies, byte for byte
    report = out / "report" / "REPORT.md"
    before = report.read_bytes()
    runs = sorted(map(str, (out / "report" / "runs").glob("*/*")))
    args = ["report", *runs, "--out", str(out / "report"), "--suite", str(suite_file), "--quick"]
    assert f"dropsplit {' '.join(args[:1])} {out / 'report'}/runs/*/*" in before.decode()
    assert main(args) == 0
    assert report.read_bytes() == before


def test_unknown_run_names_are_an_error(suite_file, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["reproduce", "--suite", str(suite_file), "--out", str(out), "--only", "dropout-3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no run named dropout-3" in err
    assert "its runs: dropout-1, dropout-2, analytic, explicit" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "only, expected",
    [
        ({"dropout-1"}, ["dropout-1/seed0", "dropout-1/seed1"]),
        ({"dropout-1:1"}, ["dropout-1/seed1"]),
        ({"dropout-1:0", "explicit"}, ["dropout-1/seed0", "explicit/seed0"]),
    ],
    ids=["name-every-seed", "name-one-seed", "mixed"],
)
def test_only_selects_runs_by_name_or_by_name_and_seed(suite_file, only, expected):
    assert [r.directory for r in selected(load_suite(suite_file), only)] == expected


@pytest.mark.parametrize("entry", ["dropout-1:2", "explicit:1", "dropout-3:0", "dropout-1:x"])
def test_a_seed_the_suite_lacks_is_an_error(suite_file, tmp_path, capsys, entry):
    out = tmp_path / "runs"
    args = ["reproduce", "--suite", str(suite_file), "--out", str(out), "--only", entry]
    assert main(args) == 2
    assert f"no run named {entry} (NAME or NAME:SEED" in capsys.readouterr().err
    assert not out.exists()


def test_default_run_directory_follows_the_suite():
    from dropsplit.cli import default_out

    assert default_out("configs/paper/suite-char.toml", quick=True) == "runs/paper-char-quick"
    assert default_out("configs/paper/suite.toml", quick=False) == "runs/paper"


def test_report_of_nothing_is_an_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"name": "x", "group": "g", "seed": 0}))
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_bench_command_is_reachable_from_the_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--memory-only" in capsys.readouterr().out


PAPER_CONFIGS = Path(__file__).parents[1] / "configs" / "paper"


@pytest.mark.parametrize(
    "name", sorted(str(p.relative_to(PAPER_CONFIGS)) for p in PAPER_CONFIGS.rglob("suite*.toml"))
)
def test_shipped_suites_load_and_every_run_config_is_valid(name):
    suite = load_suite(PAPER_CONFIGS / name)
    for spec in suite.runs:
        config = load_config(suite.base, list(spec.overrides))
        assert config.train.seed == 1111 + spec.seed
    assert suite.description


def test_curve_goes_on_with_the_seeds_left_after_early_stopping():
    """Seeds stopped early: the mean curve runs to the longest seed, over the seeds left."""
    from dropsplit.experiments.report import Run, _curve

    def run(seed, ppls):
        metrics = [
            {"epoch": e + 1, "seconds": 60.0 * (e + 1), "val_ppl": v} for e, v in enumerate(ppls)
        ]
        return Run("r", "g", seed, "r", {}, metrics, Path("."))

    xs, mean, low, high = _curve([run(0, [9.0, 7.0]), run(1, [11.0, 5.0, 4.0, 3.0])], "epoch")
    assert xs == [1, 2, 3, 4]
    assert mean == [10.0, 6.0, 4.0, 3.0]
    assert low == [9.0, 5.0, 4.0, 3.0] and high == [11.0, 7.0, 4.0, 3.0]
    assert _curve([run(0, [9.0, 7.0])], "minutes")[0] == [1.0, 2.0]
    # against wall time: epochs times the mean pace (1 and 2 min/epoch), monotone
    slow = Run("r", "g", 2, "r", {}, [{"epoch": 1, "seconds": 120.0, "val_ppl": 8.0}], Path("."))
    assert _curve([slow, run(1, [11.0, 5.0])], "minutes")[0] == [1.5, 3.0]


@pytest.mark.parametrize("n_runs", [3, 13], ids=["few-runs", "more-than-ten"])
def test_every_curve_of_a_figure_has_its_own_colour(tmp_path, monkeypatch, n_runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dropsplit.experiments.report import Run, plot_groups

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its lines
    metrics = [{"epoch": e, "seconds": 60.0 * e, "val_ppl": 10.0 - e} for e in (1, 2)]
    groups = {
        f"r{i}": [Run(f"r{i}", "ablations", 0, f"r{i}", {}, metrics, tmp_path)]
        for i in range(n_runs)
    }
    assert plot_groups(groups, tmp_path) == ["fig6_ablations.png"]
    colours = [line.get_color() for line in figures[0].axes[0].get_lines()]
    assert len(colours) == n_runs and len(set(map(str, colours))) == n_runs


def test_shipped_configs_are_found_outside_a_clone(tmp_path, monkeypatch):
    """From another directory, configs/... resolves to the copy shipped in the package."""
    from dropsplit.training.config import find_config

    monkeypatch.chdir(tmp_path)
    suite = load_suite("configs/paper/suite-char.toml")
    assert suite.base.name == "base-char.toml" and suite.base.exists()
    assert load_config("configs/ptb-small.toml").data.corpus == "ptb"
    assert find_config("configs/nowhere.toml") == Path("configs/nowhere.toml")


def test_report_tables_every_measurement_with_the_full_second_order_term(tmp_path):
    """measure/ and measure-q0.05/ of the Dropout_1 run are copied and tabled, the second with
    its q and the Hutchinson column; ratios are gap / prediction."""
    run = tmp_path / "dropout-1" / "seed0"
    run.mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps({"name": "dropout-1", "group": "dropout-k", "seed": 0})
    )
    summary = {"best_val_ppl": 6.0, "test_ppl": 5.8, "epochs": 1, "train_seconds": 60.0}
    config = {"method": {"name": "dropout", "k": 1}, "data": {"train_fraction": 1.0}, "model": {}}
    summary |= {"seconds_per_step": 0.1, "config": config}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "epoch": 1, "seconds": 60.0, "val_ppl": 6.0}) + "\n"
    )
    site = {"gap": 0.02, "gap_stderr": 0.001, "mask": 0.04, "element": 0.05}
    trained = {"curvature": "exact", "samples": {"gap": 8}, "sites": {"input": site}, "total": site}
    full = {**site, "full": 0.025, "full_stderr": 0.002}
    small_q = {**trained, "q": 0.05, "sites": {"input": full}, "total": full}
    for directory, m in (("measure", trained), ("measure-q0.05", small_q)):
        (run / directory).mkdir()
        (run / directory / "measure.json").write_text(json.dumps(m))
    report = write_report([run], tmp_path / "report")
    text = report.read_text()
    assert (
        tmp_path / "report" / "runs" / "dropout-1" / "seed0" / "measure-q0.05" / "measure.json"
    ).exists()
    assert "every dropping site at q = 0.05; `measure-q0.05/`" in text
    assert (
        "| input | 0.0200 | 1.00e-03 | 0.0400 | 0.0500 | 0.50 | 0.0250 | 2.00e-03 | 0.80 |" in text
    )
    assert "| input | 0.0200 | 1.00e-03 | 0.0400 | 0.0500 | 0.50 |\n" in text  # the trained-q table


REPO = Path(__file__).parents[1]
COMMITTED_REPORTS = sorted(
    p.parent.relative_to(REPO).as_posix()
    for p in (REPO / "docs" / "results").glob("**/REPORT.md")
    if "`dropsplit report " in p.read_text().split("\n", 4)[3]
)


@pytest.mark.parametrize("report", COMMITTED_REPORTS)
def test_every_committed_report_regenerates_byte_for_byte(report, tmp_path, monkeypatch):
    """Each committed report's REPORT.md from a copy of its directory (the run summaries and the
    measurements beside them), by the command on its fourth line (issue 29: reports regenerate
    from committed summaries with the rules in force)."""
    committed = (REPO / report / "REPORT.md").read_text()
    command = re.search(r"`dropsplit (report .*?)`", committed.split("\n", 4)[3]).group(1)
    copy = tmp_path / "report"
    shutil.copytree(REPO / report, copy)
    monkeypatch.chdir(REPO)
    argv = []
    for word in shlex.split(command):
        if word == report or word.startswith(f"{report}/"):
            word = str(copy) + word[len(report) :]
        argv += sorted(glob.glob(word)) if "*" in word else [word]
    assert main(argv) == 0
    assert (copy / "REPORT.md").read_text() == committed.replace(report, str(copy))
