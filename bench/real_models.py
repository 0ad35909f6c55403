"""Every method on models nobody here wrote: does it run, is its gradient right, what it costs.

Tiny config-built ``transformers`` models (random init, no hub) converted with ``ds.convert``
(GPT-2 and Llama causal LMs, BERT and DistilBERT classifiers, sdpa attention, every dropout at
0.1), and a residual conv + BatchNorm net whose stochastic depth is a ``ds.ExampleDropout`` site
(what ``ds.convert`` makes of timm's ``DropPath``). For every method:

* ``works``: the step runs;
* ``check``: for the analytic estimators, ``||g - g_double-backward|| / ||g_double-backward||``
  with the same draws (``finite-difference`` draws its own signs, so its single draw differs
  from double backward by its noise; it is unbiased only in expectation); for the other
  methods, the step's gradient against autograd of the method's objective replayed with the
  same generator state;
* ``ratio``: step time over a ``DropoutK(1)`` step of the same round, median of ``--repeats``
  interleaved rounds in one process (as ``dropsplit bench``).

    OMP_NUM_THREADS=1 python bench/real_models.py --repeats 5 > docs/results/real_models.md
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters
from dropsplit.integrations.hf_forward import causal_lm_forward, classification_forward

METHODS = {
    "DropoutK(1)": lambda: ds.DropoutK(1, seed=0),
    "NoDropout": lambda: ds.NoDropout(seed=0),
    "DropoutK(2, difference)": lambda: ds.DropoutK(2, noise="difference", seed=0),
    "RDrop(0.5)": lambda: ds.RDrop(0.5, seed=0),
    "Fraternal(0.1)": lambda: ds.Fraternal(0.1, seed=0),
    "Analytic double-backward": lambda: ds.Analytic(  # the reference of the estimators
        gradient=ds.DoubleBackward(batched=False), seed=0
    ),
    "Analytic double-backward batched": lambda: ds.Analytic(seed=0),  # the default
    "Analytic jvp": lambda: ds.Analytic(gradient="jvp", seed=0),
    "Analytic hvp-difference": lambda: ds.Analytic(gradient="hvp-difference", seed=0),
    "Analytic finite-difference": lambda: ds.Analytic(gradient="finite-difference", seed=0),
}
ESTIMATORS = {"double-backward batched", "jvp", "hvp-difference", "finite-difference"}


def transformers_model(family):
    def build():
        import transformers as t

        t.logging.set_verbosity_error()
        torch.manual_seed(0)
        common = {"vocab_size": 256, "attn_implementation": "sdpa"}
        if family == "gpt2":
            config = t.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, **common)
            model, forward_fn = t.GPT2LMHeadModel(config), causal_lm_forward
        elif family == "llama":
            config = t.LlamaConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                attention_dropout=0.1, **common,
            )  # fmt: skip
            model, forward_fn = t.LlamaForCausalLM(config), causal_lm_forward
        elif family == "bert":
            config = t.BertConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64, num_labels=4, **common,
            )  # fmt: skip
            model, forward_fn = t.BertForSequenceClassification(config), classification_forward
        else:
            config = t.DistilBertConfig(
                dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64,
                num_labels=4, **common,
            )  # fmt: skip
            model = t.DistilBertForSequenceClassification(config)
            forward_fn = classification_forward
        model = ds.convert(model).train()
        ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
        labels = ids if forward_fn is causal_lm_forward else torch.arange(8) % 4
        return f"{family} (sdpa)", model, forward_fn, {"input_ids": ids, "labels": labels}

    return build


class ResidualBlock(nn.Module):
    """conv + BN + ReLU + conv + BN, stochastic depth on the branch, then the skip."""

    def __init__(self, channels, drop_path):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
        )  # fmt: skip
        self.drop_path = ds.ExampleDropout(drop_path)

    def forward(self, x):
        """``relu(x + drop_path(branch(x)))``."""
        return torch.relu(x + self.drop_path(self.branch(x)))


def resnet():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ResidualBlock(16, 0.1), ResidualBlock(16, 0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), ds.Dropout(0.2), nn.Linear(16, 10),
    )  # fmt: skip
    batch = (torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))
    return "ResNet + DropPath (ReLU)", model, lambda m, b: (m(b[0]), b[1]), batch


BUILDERS = [transformers_model(f) for f in ("gpt2", "bert", "distilbert", "llama")] + [resnet]


def step(method, model, forward_fn, batch):
    model.zero_grad(set_to_none=True)
    method.step(model, forward_fn, batch)
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)])


def objective_gradient(make, model, forward_fn, batch):
    """Autograd of the objective, replayed with the generator state the step starts from."""
    method = make()
    params = trainable_parameters(model)
    grads = torch.autograd.grad(method.objective(model, forward_fn, batch).scalar, params)
    return torch.cat([g.reshape(-1) for g in grads])


def checks(model, forward_fn, batch):
    """Relative gradient check of each method (float64 copy: the method's own error)."""
    model = copy.deepcopy(model).double()
    batch = {k: v for k, v in batch.items()} if isinstance(batch, dict) else batch
    if not isinstance(batch, dict):
        batch = (batch[0].double(), batch[1])
    exact = step(METHODS["Analytic double-backward"](), model, forward_fn, batch)
    out = {}
    for name, make in METHODS.items():
        try:
            g = step(make(), model, forward_fn, batch)
        except Exception as error:  # noqa: BLE001 (a row of the table says why)
            out[name] = f"fails: {type(error).__name__}: {str(error)[:60]}"
            continue
        gradient = name.removeprefix("Analytic ")
        if gradient in ESTIMATORS:
            reference = exact
        else:
            reference = objective_gradient(make, model, forward_fn, batch)
        out[name] = f"{float((g - reference).norm() / reference.norm()):.1e}"
    return out


def ratios(model, forward_fn, batch, repeats, names):
    methods = {name: METHODS[name]() for name in names}
    times = {name: [] for name in methods}
    for method in methods.values():  # warm-up
        step(method, model, forward_fn, batch)
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            step(method, model, forward_fn, batch)
            times[name].append(time.perf_counter() - start)
    base = times["DropoutK(1)"]
    return {
        name: statistics.median(a / b for a, b in zip(t, base, strict=True))
        for name, t in times.items()
    }, statistics.median(base)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    print(f"`{prefix}python {' '.join(sys.argv)}`\n")
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); check in float64, ratio in float32 (median of "
        f"{args.repeats} rounds)\n"
    )
    print("| model | method | works | check | ratio to DropoutK(1) |")
    print("|---|---|---|---:|---:|")
    for build in BUILDERS:
        name, model, forward_fn, batch = build()
        check = checks(model, forward_fn, batch)
        working = [m for m in METHODS if not check[m].startswith("fails")]
        cost, base = ratios(model, forward_fn, batch, args.repeats, working)
        for method in METHODS:
            ratio = f"{cost[method]:.2f}" if method in cost else "-"
            works = "yes" if method in cost else "no"
            print(f"| {name} | {method} | {works} | {check[method]} | {ratio} |")
        print(f"| {name} | (DropoutK(1) step: {base * 1e3:.1f} ms) | | | |", flush=True)


if __name__ == "__main__":
    main()
