import json

import pytest
import torch
from conftest import mlp_forward
from torch import nn

import dropsplit as ds
from dropsplit.cli import main
from dropsplit.measure.effects import format_effects, measure_effects, subspace_alignment, top_eigen


def test_top_eigen_matches_the_dense_eigendecomposition():
    torch.manual_seed(0)
    draws = torch.randn(40, 6) @ torch.diag(torch.tensor([5.0, 3, 1, 0.5, 0.1, 0.1]))
    values, vectors = top_eigen(draws, 3)
    dense = torch.linalg.eigvalsh(draws.T @ draws / 40).flip(0)[:3]
    assert torch.allclose(values, dense, rtol=1e-6)
    assert subspace_alignment(vectors, vectors) == __import__("pytest").approx(1.0)


def test_measure_effects_on_a_converted_user_model(tmp_path):
    torch.manual_seed(0)
    model = ds.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3)))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    result = measure_effects(model, mlp_forward, [batch], gap_samples=400, noise_samples=200)
    row = result["sites"]["2"]
    assert result["curvature"] == "exact"
    # dropout before a linear head at small q: the prediction is the second-order gap
    assert abs(row["gap"] - row["mask"]) < 4 * row["gap_stderr"] + 0.05 * row["mask"]
    for kind in ("difference", "analytic"):
        ratio = result["noise"][kind]["trace"] / result["noise"]["dropout"]["trace"]
        assert 0.7 < ratio < 1.3
    assert "gap/mask" in format_effects(result)


def test_measure_command_on_a_trained_run(tmp_path, capsys):
    config = "configs/synthetic-tiny.toml"
    main(["train", config, "--out", str(tmp_path / "r"), "--set", "train.max_steps=5"])
    out = tmp_path / "m"
    assert (
        main(
            [
                "measure",
                str(tmp_path / "r"),
                "--batches",
                "1",
                "--gap-samples",
                "8",
                "--noise-samples",
                "6",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "weight_hh.0" in text and "alignment" in text
    result = json.loads((out / "measure.json").read_text())
    assert set(result["sites"]) == {"input", "weight_hh.0", "weight_hh.1", "hidden.0", "output"}
    assert (out / "gap_vs_prediction.png").stat().st_size > 1000
    assert (out / "noise_spectra.png").stat().st_size > 1000


def test_measure_at_a_chosen_q_with_the_full_curvature(tmp_path, capsys):
    """--q moves every dropping site to q; --full-samples adds the Hutchinson column, whose
    values are explicit_regularizer(curvature="full") on the same batch and seed."""
    config = "configs/synthetic-tiny.toml"
    main(["train", config, "--out", str(tmp_path / "r"), "--set", "train.max_steps=5"])
    out = tmp_path / "m"
    args = ["measure", str(tmp_path / "r"), "--batches", "1", "--gap-samples", "8"]
    args += ["--noise-samples", "6", "--q", "0.05", "--full-samples", "3", "--out", str(out)]
    assert main(args) == 0
    assert "gap/full" in capsys.readouterr().out
    result = json.loads((out / "measure.json").read_text())
    assert result["q"] == 0.05 and result["samples"]["full"] == 3
    for row in (*result["sites"].values(), result["total"]):
        assert row["full_stderr"] >= 0 and "full" in row
    assert result["total"]["full"] == pytest.approx(
        sum(r["full"] for r in result["sites"].values())
    )
    assert main(["measure", str(tmp_path / "r"), "--q", "1.0"]) == 2
    assert "--q must be in [0, 1), got 1.0" in capsys.readouterr().err
