"""Minibatch noise and the noise scale: against numpy's covariance and dropout's exact one."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HeadMLP, make_problem, mlp_forward

from dropsplit import oracles
from dropsplit.cli import main
from dropsplit.measure import minibatch_noise, noise_scale

PROBLEMS = ["mlp-head", "rnn-locked", "qrnn-lm", "transformer-lm"]


def _batches(name, n):
    """The seed-0 model of problem ``name`` and ``n`` batches of the same shape."""
    return make_problem(name).model, [make_problem(name, seed=s).batch for s in range(n)]


def _clean_gradients(model, forward_fn, batches):
    """Per batch, the autograd gradient of the mean cross-entropy in eval mode (sites: identity)."""
    model.eval()
    rows = []
    for batch in batches:
        logits, targets = forward_fn(model, batch)[:2]
        grads = torch.autograd.grad(F.cross_entropy(logits, targets), list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    model.train()
    return np.stack(rows)


@pytest.mark.parametrize("name", PROBLEMS)
def test_minibatch_noise_has_numpys_sample_covariance_of_the_batch_gradients(name):
    model, batches = _batches(name, 5)
    pb = make_problem(name)
    draws = minibatch_noise(model, pb.forward_fn, batches)
    gradients = _clean_gradients(model, pb.forward_fn, batches)
    expected = np.cov(gradients, rowvar=False, ddof=1)
    np.testing.assert_allclose((draws.T @ draws / len(batches)).numpy(), expected, atol=1e-12)
    assert torch.allclose(draws.sum(0), torch.zeros(draws.shape[1]), atol=1e-12)


def test_minibatch_noise_of_one_batch_repeated_is_zero_and_one_batch_is_refused():
    pb = make_problem("mlp-head")
    assert minibatch_noise(pb.model, pb.forward_fn, [pb.batch] * 3).abs().max() < 1e-15
    with pytest.raises(ValueError, match="at least 2 batches"):
        minibatch_noise(pb.model, pb.forward_fn, [pb.batch])


def test_noise_scale_puts_the_exact_dropout_trace_over_the_minibatch_trace():
    torch.manual_seed(0)
    model = HeadMLP(d_in=3, d_hidden=5, classes=4, p_hidden=0.3)
    batches = [(torch.randn(2, 3), torch.randint(0, 4, (2,))) for _ in range(3)]
    result = noise_scale(model, mlp_forward, batches, samples=3000, seed=1)
    exact = [
        float(oracles.exact_noise_covariance(model, mlp_forward, b, "dropout").trace())
        for b in batches
    ]
    gradients = _clean_gradients(model, mlp_forward, batches)
    minibatch = float(np.trace(np.cov(gradients, rowvar=False, ddof=1)))
    assert result["dropout"] == pytest.approx(np.mean(exact), rel=0.05)
    assert result["minibatch"] == pytest.approx(minibatch, rel=1e-10)
    assert result["ratio"] == pytest.approx(result["dropout"] / result["minibatch"])
    assert result["batches"] == 3 and result["dropout_stderr"] > 0


def test_noise_scale_command_on_a_trained_run(tmp_path, capsys):
    config = "configs/synthetic-tiny.toml"
    main(["train", config, "--out", str(tmp_path / "r"), "--set", "train.max_steps=5"])
    assert main(["noise-scale", str(tmp_path / "r"), "--batches", "3", "--samples", "4"]) == 0
    assert "ratio" in capsys.readouterr().out
    result = json.loads((tmp_path / "r" / "noise_scale.json").read_text())
    assert result["batches"] == 3 and result["batch_size"] == 8 and result["ratio"] > 0
    assert main(["noise-scale", str(tmp_path / "r"), "--batches", "1"]) == 2
    assert "--batches must be at least 2" in capsys.readouterr().err
    assert main(["noise-scale", str(tmp_path / "r"), "--batches", "100000"]) == 2
    assert "the training text has only" in capsys.readouterr().err
