"""Every method on the three language models (LSTM, QRNN, Transformer), and their training runs.

The method-level checks on tiny QRNN and Transformer LMs (HVP differences against double backward,
the grouped regularizer against the brute-force oracle, step gradients against finite
differences of the objective) run in the shared problem list of ``conftest.PROBLEMS``; this file
adds what needs a whole language model.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import LANGUAGE_MODELS, make_problem

import dropsplit as ds
from dropsplit import oracles
from dropsplit.cli import main
from dropsplit.training.config import load_config
from dropsplit.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "synthetic-tiny.toml"
MODEL_NAMES = ["lstm", "qrnn", "transformer"]


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
def test_exact_step_is_the_derivative_of_loss_plus_label_regularizer(name):
    """Analytic(label, no noise) is deterministic: its gradient is the derivative of
    clean loss + explicit_regularizer(curvature="label"), taken by central differences."""
    pb = make_problem(name)
    pb.model.zero_grad(set_to_none=True)
    ds.Analytic("label", False, seed=0).step(pb.model, pb.forward_fn, pb.batch)
    params = list(pb.model.parameters())
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    direction = torch.randn(grad.numel(), generator=torch.Generator().manual_seed(3))
    base = [p.detach().clone() for p in params]

    def objective(eps):
        with torch.no_grad():
            offset = 0
            for p, b in zip(params, base, strict=True):
                p.copy_(b + eps * direction[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return oracles.clean_loss(pb.model, pb.forward_fn, pb.batch) + ds.explicit_regularizer(
            pb.model, pb.forward_fn, pb.batch, "label"
        )

    eps = 1e-5
    slope = (objective(eps) - objective(-eps)) / (2 * eps)
    objective(0.0)
    assert slope == pytest.approx(float(grad @ direction), rel=1e-6)


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
@pytest.mark.parametrize("noise", [None, "difference", "analytic"])
def test_dropout_k_loop_equals_batch_duplication(name, noise):
    pb = make_problem(name)
    grads = {}
    for impl in ("loop", "batch"):
        pb.model.zero_grad(set_to_none=True)
        ds.DropoutK(3, noise, implementation=impl, seed=4).step(pb.model, pb.forward_fn, pb.batch)
        grads[impl] = [p.grad.clone() for p in pb.model.parameters()]
    for a, b in zip(grads["loop"], grads["batch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
def test_measurements_run_on_every_model(name):
    pb = make_problem(name)
    gap = ds.explicit_gap(pb.model, pb.forward_fn, pb.batch, 20, seed=0)
    mask = ds.explicit_regularizer(pb.model, pb.forward_fn, pb.batch, "exact", per_site=True)
    element = ds.explicit_regularizer(pb.model, pb.forward_fn, pb.batch, grouping="element")
    assert math.isfinite(gap.mean) and set(mask) == {n for n, _ in ds.named_sites(pb.model)}
    assert element > 0
    for kind in ("dropout", "difference", "analytic"):
        draws = ds.gradient_noise(pb.model, pb.forward_fn, pb.batch, kind, 3, seed=0)
        assert draws.shape[0] == 3 and torch.isfinite(draws).all()


def tiny_args(out, model, *extra):
    args = ["train", str(TINY), "--out", str(out), "--set", f"model.name={model}"]
    for o in extra:
        args += ["--set", o]
    return args


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_a_tiny_training_run_per_model_through_the_cli(tmp_path, model, capsys):
    assert main(tiny_args(tmp_path / "run", model, "train.max_steps=6", "train.eval_every=3")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and math.isfinite(summary["test_ppl"])
    assert main(["measure", str(tmp_path / "run"), "--batches", "1"]) == 0
    assert (tmp_path / "run" / "measure" / "measure.json").exists()
    assert main(tiny_args(tmp_path / "dry", model, "method.name=analytic") + ["--dry-run"]) == 0


@pytest.mark.parametrize("model", ["qrnn", "transformer"])
def test_resume_gives_identical_metrics(tmp_path, model):
    config = load_config(
        TINY,
        [
            f"model.name={model}",
            "train.max_steps=12",
            "train.eval_every=4",
            "train.checkpoint_every=3",
            "method.name=analytic",
            "method.gradient=hvp-difference",
        ],
    )
    straight = train(config, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "b", interrupt_at_step=8)
    resumed = train(config, tmp_path / "b", resume=True)
    assert resumed["best_val_loss"] == straight["best_val_loss"]
    a, b = ((tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in "ab")
    drop = {"seconds", "cpu_seconds", "tokens_per_second"}
    assert [{k: v for k, v in json.loads(x).items() if k not in drop} for x in a] == [
        {k: v for k, v in json.loads(x).items() if k not in drop} for x in b
    ]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.name=gru"], "model.name must be one of"),
        (["model.name=transformer", "model.heads=3"], "model.heads"),
        (["model.name=transformer", "model.context=8"], "model.context"),
        (["model.forget_mult=cuda"], "model.forget_mult must be one of"),
        (["model.p_attention=1.0"], r"model.p_attention must be in \[0, 1\)"),
    ],
)
def test_model_keys_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(TINY, overrides)
