"""The matrix report: every cell is its column's single-report verdict; coverage; data size."""

import json
import re
from pathlib import Path

import pytest
from suite_configs import BASE, config_for, overrides_for

from dropsplit.cli import main
from dropsplit.experiments.matrix import (
    claim_panels,
    data_size_table,
    load_columns,
    missing_cost,
    shown,
    write_matrix,
)
from dropsplit.experiments.report import copy_runs, load_runs, write_report
from dropsplit.experiments.reproduce import load_suite, suite_names, suite_path

REPO = Path(__file__).parents[1]


def _run(root, name, seed, ppl, model="lstm", seconds=60.0, best_epoch=1):
    """A finished run's small files, as `dropsplit report` copies them (10 epochs; the best
    evaluation at ``best_epoch``, the only one written)."""
    d = root / "runs" / name / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": name, "group": "g", "seed": seed}))
    config = config_for(name, f'model.name="{model}"', f"train.seed={1111 + seed}")
    summary = {"best_val_ppl": ppl, "test_ppl": ppl, "epochs": 10, "train_seconds": seconds}
    summary |= {"train_cpu_seconds": seconds, "seconds_per_step": 0.1, "config": config}
    (d / "summary.json").write_text(json.dumps(summary))
    line = {"step": 10 * best_epoch, "epoch": best_epoch, "seconds": seconds, "val_ppl": ppl}
    (d / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    return d


def _suite(path, runs, model="lstm"):
    """A suite file planning ``(name, seeds)`` runs, each with the config its name stands for."""
    entries = "".join(
        f'[[run]]\nname = "{n}"\ngroup = "g"\nseeds = {s}\n'
        f"set = {json.dumps([*overrides_for(n), f'model.name={json.dumps(model)}'])}\n"
        for n, s in runs
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.with_name(f"base-{path.stem}.toml")
    base.write_text(_toml(BASE))
    path.write_text(f'base = "{base.name}"\n' + entries)
    return path


def _toml(overrides):
    """A base config file from ``section.key=value`` overrides."""
    sections = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        sections.setdefault(section, []).append(f"{name} = {value}")
    return "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())


@pytest.fixture
def two_columns(tmp_path, monkeypatch):
    """An LSTM column with the Dropout_k and ablation runs, a QRNN one with fewer runs."""
    monkeypatch.chdir(tmp_path)
    lstm, qrnn = Path("lstm"), Path("qrnn")
    values = {
        "dropout-1": [5.0, 5.1, 5.05],
        "dropout-4": [5.4, 5.55, 5.45],
        "no-dropout": [6.0, 6.1, 6.05],
        "analytic": [4.6, 4.7, 4.65],
        "explicit": [4.9],
        "identity-x1": [5.3],
        "l2-1e-5": [5.6],
    }
    for name, ppls in values.items():
        for seed, ppl in enumerate(ppls):
            _run(lstm, name, seed, ppl, seconds=100.0 * (2 if name == "dropout-4" else 1))
    for name, ppls in {"dropout-1": [6.0, 6.2], "dropout-4": [5.9, 6.0]}.items():
        for seed, ppl in enumerate(ppls):
            _run(qrnn, name, seed, ppl, model="qrnn", seconds=50.0)
    plan = [("dropout-1", 3), ("dropout-4", 3), ("no-dropout", 3), ("analytic", 3)]
    _suite(Path("s/lstm.toml"), [*plan, ("explicit", 1), ("identity-x1", 1), ("l2-1e-5", 1)])
    _suite(Path("s/qrnn.toml"), [*plan, ("dropout-4-difference", 3)], model="qrnn")
    matrix = Path("matrix.toml")
    matrix.write_text(
        '[[column]]\nreport = "lstm"\nsuite = "s/lstm.toml"\n'
        '[[column]]\nreport = "qrnn"\nsuite = "s/qrnn.toml"\n'
    )
    return matrix


def _matrix_cells(text):
    """Claim key -> the row's cells (one per column)."""
    rows = [line.removesuffix(" |") for line in text.splitlines() if line.startswith("| (")]
    return {re.match(r"\| \((.+?)\) ", row)[1]: row.split(" | ")[1:] for row in rows}


def test_every_cell_is_its_columns_single_report_verdict(two_columns, tmp_path):
    """Two ways to the same verdict: the matrix's cell and the column's own REPORT.md row."""
    text = write_matrix(two_columns, "out", "cmd").read_text()
    cells, compared = _matrix_cells(text), 0
    for index, report in enumerate(("lstm", "qrnn")):
        single = write_report(sorted(Path(report, "runs").glob("*/*")), tmp_path / f"r{index}")
        for row in single.read_text().splitlines():
            match = re.match(r"\| \((.+?)\) .* \| (.*) \| \*\*(.+)\*\* \|$", row)
            if not match or match[1] not in cells:
                continue
            key, effect, verdict = match[1], match[2].split(" | ")[-1], match[3]
            if cells[key][index] != "-":  # a claim the column's suite does not plan: no cell
                assert cells[key][index] == f"**{verdict}**<br>{effect}", key
                compared += 1
    assert compared == 8  # LSTM: a, c, d, e, noise; QRNN: a, b (not run), d
    assert cells["a"][0].startswith("**inconclusive**") or cells["a"][0].startswith("**reproduced")
    assert cells["d"][1] == "**not run**<br>missing runs: analytic"


def test_claims_a_suite_does_not_plan_are_a_dash(two_columns):
    cells = _matrix_cells(write_matrix(two_columns, "out", "cmd").read_text())
    assert cells["e"][0].startswith("**") and cells["e"][1] == "-"
    assert cells["b"][0] == "-"  # no difference-noise run in the LSTM suite
    assert cells["b"][1].startswith("**not run**<br>missing runs: dropout-4-difference")


def test_the_matrix_regenerates_byte_for_byte(two_columns):
    write_matrix(two_columns, "out", "cmd")
    first = {p.name: p.read_bytes() for p in Path("out").iterdir()}
    write_matrix(two_columns, "out", "cmd")
    second = {p.name: p.read_bytes() for p in Path("out").iterdir()}
    assert first == second and "claim_a.png" in first and "claim_e.png" in first


def test_missing_seeds_are_costed_from_their_own_or_another_columns_runs(two_columns):
    columns = load_columns(two_columns)
    # own seeds: the LSTM's dropout-4 took 200 CPU-s a seed
    assert missing_cost(columns, 0, "dropout-4") == pytest.approx(200.0)
    # no QRNN seed of no-dropout: the LSTM's 100 s scaled by Dropout_1's 50 / 100
    assert missing_cost(columns, 1, "no-dropout") == pytest.approx(50.0)
    assert missing_cost(columns, 1, "dropout-4-difference") is None
    text = Path(write_matrix(two_columns, "out", "cmd")).read_text()
    # 3 - 2 seeds of dropout-4 at 50 s, 3 of no-dropout and analytic at 50 s each: 350 s, and
    # dropout-4-difference's unknown cost on top: a lower bound
    assert "| QRNN · PTB characters | `dropout-4` | 2 / 3 | 0.0 |" in text
    assert "| QRNN · PTB characters | `dropout-4-difference` | 0 / 3 | no seed anywhere" in text
    assert "| QRNN · PTB characters | **in all** | | **at least 0.1** |" in text


def test_data_size_table_has_a_row_per_fraction_with_the_order(tmp_path, monkeypatch):
    """Sizes by the runs' configs; the gap by the paired test; one seed: no test; † marks the
    budget-limited runs and their size's sentence."""
    monkeypatch.chdir(tmp_path)
    for seed, (a, b) in enumerate([(5.0, 5.3), (5.1, 5.45)]):
        _run(Path("r"), "dropout-1", seed, a)
        _run(Path("r"), "dropout-8", seed, b)
    for seed, (a, b) in enumerate([(3.2, 3.0), (3.25, 3.02), (3.22, 3.05)]):
        _run(Path("r"), "data-0.02-dropout-1", seed, a, best_epoch=10)  # the last of 10 epochs
        _run(Path("r"), "data-0.02-dropout-8", seed, b)
    _run(Path("r"), "data-0.0025-dropout-1", 0, 7.0)
    _run(Path("r"), "data-0.0025-dropout-8", 0, 7.5)
    _suite(Path("s.toml"), [("dropout-1", 2)])
    Path("m.toml").write_text('[[column]]\nreport = "r"\nsuite = "s.toml"\n')
    (column,) = load_columns("m.toml")
    lines = data_size_table(column)
    assert (
        "| 0.0025 | 7.00 (1 seed) | 7.50 (1 seed) | 1 < 8 | Dropout_8: +0.50 (1 seed: no test) |"
        in lines
    )
    assert (
        "| 0.005 | 5.05 ± 0.07 (2) | 5.38 ± 0.11 (2) | 1 < 8 | "
        "Dropout_8: +0.33 [+0.01, +0.64], p = 0.049 (paired n = 2) |" in lines
    )
    assert (
        "| 0.02 | 3.22 ± 0.03 (3)† | 3.02 ± 0.03 (3) | 8 < 1 | "
        "Dropout_8: -0.20 [-0.27, -0.13], p = 0.0074 (paired n = 3) |" in lines
    )
    assert (
        "The largest k is not clearly worse than Dropout_1 (no 95 % interval above 0; one seed "
        "has none) at training fraction 0.0025, 0.02; there the implicit effect is not seen."
        in lines
    )
    better = "It is clearly better at training fraction 0.02: the order of the paper's"
    assert any(line.startswith(better) for line in lines)
    assert any(
        line.startswith("Runs at training fraction 0.02 are budget-limited") for line in lines
    )


def test_a_claims_figure_has_a_panel_per_column_that_plans_it(two_columns):
    """The figure's panels and the table's non-dash cells are the same columns."""
    from dropsplit.experiments.claims import CLAIMS

    columns = load_columns(two_columns)
    cells = _matrix_cells(write_matrix(two_columns, "out", "cmd").read_text())
    for claim in CLAIMS:
        panels = [column.label for column, _ in claim_panels(claim, columns)]
        row = zip(columns, cells[claim.key], strict=True)
        with_cell = [column.label for column, cell in row if cell != "-"]
        assert panels == with_cell, claim.key
    claim_b = next(c for c in CLAIMS if c.key == "b")  # the QRNN suite alone plans (b)
    [(column, names)] = claim_panels(claim_b, columns)
    assert column.label.startswith("QRNN") and names == ["dropout-1", "dropout-4"]


def test_a_figure_draws_the_claims_runs_in_natural_order():
    from dropsplit.experiments.claims import CLAIMS

    claim_a = next(c for c in CLAIMS if c.key == "a")
    names = ["dropout-16", "dropout-2", "no-dropout", "dropout-4-difference", "dropout-1"]
    assert shown(claim_a, names) == ["dropout-1", "dropout-2", "dropout-16", "no-dropout"]
    # a number and a word in the same place sort without comparing the two
    claim_e = next(c for c in CLAIMS if c.key == "e")
    assert shown(claim_e, ["label-x1", "label-0.3", "l2-adamw-0.1", "l2-1e-5"]) == [
        "l2-1e-5",
        "l2-adamw-0.1",
        "label-0.3",
        "label-x1",
    ]


def test_suites_are_found_by_name():
    names = suite_names()
    assert {"char", "char-qrnn", "char-transformer", "char-wt2", "char-time", "word"} <= set(names)
    assert suite_path("char-qrnn").name == "suite-char-qrnn.toml"
    assert suite_path("word").name == "suite.toml"
    assert (
        load_suite("char-transformer").runs
        == load_suite(REPO / "configs" / "paper" / "suite-char-transformer.toml").runs
    )
    with pytest.raises(ValueError, match="no suite named 'nope'; the suites are char, "):
        suite_path("nope")


def test_reproduce_with_an_unknown_suite_name_is_one_clear_error(capsys):
    assert main(["reproduce", "--suite", "nope", "--out", "x"]) == 2
    assert "error: no suite named 'nope'" in capsys.readouterr().err


def test_the_committed_matrix_report_regenerates(tmp_path, monkeypatch):
    """REPORT.md of docs/results/matrix from the committed summaries, byte for byte."""
    committed = REPO / "docs" / "results" / "matrix" / "REPORT.md"
    if not committed.exists():
        pytest.skip("no committed matrix report yet")
    monkeypatch.chdir(REPO)
    command = "dropsplit matrix configs/paper/matrix.toml --out docs/results/matrix"
    report = write_matrix("configs/paper/matrix.toml", tmp_path, command)
    assert report.read_text() == committed.read_text()


def test_explicit_gap_rows_divide_the_gap_by_each_prediction(two_columns):
    """gap / R_approx and gap / full per site from a measure.json, and 'not measured' without."""
    site = {"gap": 0.03, "mask": 0.06, "element": 0.07, "full": 0.025}
    measured = {"q": 0.05, "curvature": "sampled", "sites": {"input": site}, "total": site}
    target = Path("lstm/runs/dropout-1/seed0/measure-q0.05")
    target.mkdir()
    (target / "measure.json").write_text(json.dumps(measured))
    text = write_matrix(two_columns, "out", "cmd").read_text()
    row = "| `lstm/runs/dropout-1/seed0/measure-q0.05` | 0.05 | input 0.50 (1.20) | 0.50 (1.20) |"
    assert f"| LSTM · PTB characters {row}" in text
    assert "| QRNN · PTB characters | not measured | | | |" in text


def test_noise_scale_rows_average_the_dropout_1_seeds(two_columns):
    """Mean ± sd over the seeds with a noise_scale.json; Dropout_8's remaining noise by hand."""
    for seed, ratio in enumerate([2.0, 4.0]):
        scale = {"batches": 18, "samples": 8, "dropout": ratio, "minibatch": 1.0, "ratio": ratio}
        Path(f"lstm/runs/dropout-1/seed{seed}/noise_scale.json").write_text(json.dumps(scale))
    one = {"batches": 9, "samples": 4, "dropout": 3.0, "minibatch": 2.0, "ratio": 1.5}
    Path("lstm/runs/dropout-4/seed1/noise_scale.json").write_text(json.dumps(one))
    text = write_matrix(two_columns, "out", "cmd").read_text()
    assert "| LSTM · PTB characters | `dropout-4` | 1 | 9 x 4 | 3 | 2 | 1.5 | 0.475 |" in text
    left = [(2.0 / 8 + 1) / 3.0, (4.0 / 8 + 1) / 5.0]  # 0.41667, 0.3
    spread = abs(left[0] - left[1]) / 2**0.5
    row = f"| 2 | 18 x 8 | 3 ± 1.4 | 1 ± 0 | 3 ± 1.4 | {sum(left) / 2:.3g} ± {spread:.2g} |"
    assert f"| LSTM · PTB characters | `dropout-1` {row}" in text
    assert "| QRNN · PTB characters | not measured | | | | | | |" in text


def test_report_copies_carry_the_noise_scale(tmp_path):
    source = _run(tmp_path / "a", "dropout-1", 0, 5.0)
    (source / "noise_scale.json").write_text(json.dumps({"ratio": 2.5}))
    (copied,) = copy_runs(load_runs([source]), tmp_path / "b")
    assert copied.noise_scale == {"ratio": 2.5}
    assert (tmp_path / "b/runs/dropout-1/seed0/noise_scale.json").exists()


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"name": "qrnn"}, "QRNN · PTB characters"),
        ({}, "LSTM · PTB characters"),  # summaries from before the model registry
        (
            {"name": "hf-causal-lm", "hf": {"architecture": "gpt2"}},
            "GPT-2 (transformers) · PTB characters",
        ),
        ({"name": "digits-mlp", "mlp": {"activation": "gelu"}}, "MLP (gelu) · digits"),
    ],
    ids=["qrnn", "legacy-lstm", "hf-gpt2", "digits"],
)
def test_a_column_is_labelled_by_its_model_and_corpus(model, expected):
    from dropsplit.experiments.matrix import Column
    from dropsplit.experiments.report import Run

    data = {} if model.get("name") == "digits-mlp" else {"corpus": "ptb-char"}
    summary = {"config": {"model": model, "data": data}}
    run = Run("dropout-1", "g", 0, "Dropout_1", summary, [], Path("."))
    column = Column(Path("."), None, {"dropout-1": [run]})  # type: ignore[arg-type]
    assert column.label == expected


def test_the_matrix_refuses_cells_of_mixed_code_unless_told(two_columns, capsys):
    """The QRNN's Dropout_4 seed 1 retrained by other numerics: its (a) cell compares two code
    versions; the matrix refuses, naming it, and writes it marked ‡ when told."""
    for name in ("dropout-1", "dropout-4"):
        for seed in (0, 1):
            path = Path("qrnn") / "runs" / name / f"seed{seed}" / "summary.json"
            summary = json.loads(path.read_text())
            numerics = 2 if (name, seed) == ("dropout-4", 1) else 1
            summary["git"] = {"commit": "c" * 40, "dirty": False, "numerics": numerics}
            path.write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"\(a\) QRNN · PTB characters: numerics 1, numerics 2"):
        write_matrix(two_columns, "out", "cmd")
    assert not Path("out/REPORT.md").exists()
    assert main(["matrix", str(two_columns), "--out", "out", "--allow-mixed-code"]) == 0
    text = Path("out/REPORT.md").read_text()
    assert "--allow-mixed-code" in text and "‡ mixed code versions: numerics 1, numerics 2" in text


def test_a_longer_budget_is_costed_from_the_same_run_at_the_suites_budget(tmp_path, monkeypatch):
    """`e<N>-analytic` planned, `analytic` finished: its CPU time times N over its epochs."""
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        _run(Path("r"), "dropout-1", seed, 5.0, seconds=40.0)
        _run(Path("r"), "analytic", seed, 4.8, seconds=90.0)
    epochs = config_for("analytic")["train"]["epochs"]
    _suite(Path("s.toml"), [("dropout-1", 2), ("analytic", 2), (f"e{3 * epochs}-analytic", 2)])
    Path("m.toml").write_text('[[column]]\nreport = "r"\nsuite = "s.toml"\n')
    columns = load_columns("m.toml")
    assert missing_cost(columns, 0, f"e{3 * epochs}-analytic") == pytest.approx(270.0)
    # another method at the longer budget has no run to scale from
    _suite(Path("s.toml"), [("dropout-1", 2), ("e20-explicit", 2)])
    assert missing_cost(load_columns("m.toml"), 0, "e20-explicit") is None
