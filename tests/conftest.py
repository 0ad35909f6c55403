"""Test problems in the BackPACK style: small settings with readable ids, built in float64."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import dropsplit as ds
from dropsplit.models import awd
from dropsplit.models.toy import TinyRNNLM, lm_forward
from dropsplit.models.transformer import TransformerLM


def pytest_configure(config):
    # test workers (pytest -n) share the cores: one intra-op thread each (and in the processes
    # they start), or every parallel region of one waits for the other's threads
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-montecarlo", action="store_true", help="run the slow Monte-Carlo tier")
    parser.addoption("--run-slow", action="store_true", help="run the slow tier of process tests")


def pytest_collection_modifyitems(config, items):
    tiers = {
        "montecarlo": ("--run-montecarlo", "slow Monte-Carlo tier"),
        "slow": ("--run-slow", "slow tier (a fast test of the same behaviour runs by default)"),
    }
    for marker, (option, what) in tiers.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{what}: pass {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class HeadMLP(nn.Module):
    """tanh MLP with dropout sites on the input and just before the linear head."""

    def __init__(self, d_in=4, d_hidden=6, classes=3, p_input=0.0, p_hidden=0.2):
        super().__init__()
        self.input_dropout = ds.Dropout(p_input, label="input") if p_input else None
        self.l1 = nn.Linear(d_in, d_hidden)
        self.hidden_dropout = ds.Dropout(p_hidden, label="hidden")
        self.head = nn.Linear(d_hidden, classes)

    def forward(self, x):
        if self.input_dropout is not None:
            x = self.input_dropout(x)
        return self.head(self.hidden_dropout(torch.tanh(self.l1(x))))


def mlp_forward(model, batch):
    x, y = batch
    return model(x), y


class LinearRNN(nn.Module):
    """h_t = 0.8 h_{t-1} + W x_t, logits_t = V h_t, locked dropout on the input: the logits are
    linear in the input gate, so the Gauss-Newton expansion is exact at second order."""

    def __init__(self, q, d_in=3, hidden=6, classes=4):
        super().__init__()
        self.input_dropout = ds.Dropout(q, shared_dims=(0,), batch_dim=1, label="input")
        self.w = nn.Linear(d_in, hidden, bias=False)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        u = self.w(self.input_dropout(x))
        h, outs = torch.zeros_like(u[0]), []
        for t in range(u.shape[0]):
            h = 0.8 * h + u[t]
            outs.append(h)
        return self.head(torch.stack(outs))


def locked_forward(model, batch):
    x, y = batch
    logits = model(x)
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


@dataclass
class Problem:
    id: str
    model: nn.Module
    forward_fn: Any
    batch: Any


def make_problem(name: str, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    if name == "mlp-head":
        model = HeadMLP(d_in=4, d_hidden=6, classes=3, p_hidden=0.2)
        batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
        return Problem(name, model, mlp_forward, batch)
    if name == "mlp-two-sites":
        model = HeadMLP(d_in=3, d_hidden=5, classes=4, p_input=0.3, p_hidden=0.2)
        batch = (torch.randn(4, 3), torch.randint(0, 4, (4,)))
        return Problem(name, model, mlp_forward, batch)
    if name == "rnn-locked":
        model = TinyRNNLM(vocab=5, embedding=3, hidden=4, p_input=0.2, p_weight=0.2, p_output=0.2)
        tokens = torch.randint(0, 5, (4, 3))
        targets = torch.randint(0, 5, (4, 3))
        return Problem(name, model, lm_forward, (tokens, targets, None))
    if name in LANGUAGE_MODELS:
        model = LANGUAGE_MODELS[name]()
        tokens = torch.randint(0, 5, (4, 3))
        targets = torch.randint(0, 5, (4, 3))
        return Problem(name, model, awd.lm_forward, (tokens, targets, None))
    raise KeyError(name)


def tiny_qrnn(**kwargs):
    """Two QRNN layers (windows 2, 1) with every site of the AWD LM at q = 0.2."""
    sites = dict(p_input=0.2, p_hidden=0.2, p_output=0.2, p_weight=0.2, p_embedding=0.2)
    return awd.QRNNLM(5, 3, 4, 2, **{**sites, **kwargs})


def tiny_transformer(**kwargs):
    """One block, two heads, every site at q = 0.2."""
    sites = dict(p_input=0.2, p_attention=0.2, p_attn_out=0.2, p_mlp_hidden=0.2, p_mlp_out=0.2)
    return TransformerLM(5, 4, 1, 2, 8, mlp_width=6, **{**sites, "p_output": 0.2, **kwargs})


LANGUAGE_MODELS = {"qrnn-lm": tiny_qrnn, "transformer-lm": tiny_transformer}
PROBLEMS = ["mlp-head", "mlp-two-sites", "rnn-locked", *LANGUAGE_MODELS]


@pytest.fixture(params=PROBLEMS)
def problem(request) -> Problem:
    return make_problem(request.param)
