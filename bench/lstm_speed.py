"""Forward + backward time of dropsplit's LSTM against nn.LSTM (same process, interleaved).

Small config of the paper's LM: 3 layers 200 -> 400 -> 400 -> 200, bptt 35, batch 20.
    python bench/lstm_speed.py [--repeats 15]
"""

import argparse
import itertools
import json
import statistics
import time

import torch
from torch import nn

from dropsplit.models.lstm import LSTMLayer


def stack(sizes, ours, implementation="fused"):
    if ours:
        return nn.ModuleList(LSTMLayer(a, b, implementation) for a, b in itertools.pairwise(sizes))
    return nn.ModuleList(nn.LSTM(a, b) for a, b in itertools.pairwise(sizes))


def run(layers, x):
    for layer in layers:
        x = layer(x)[0]
    x.square().mean().backward()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes = [200, 400, 400, 200]
    x = torch.randn(35, 20, 200)
    models = {
        "nn.LSTM": stack(sizes, False),
        "dropsplit fused": stack(sizes, True, "fused"),
        "dropsplit loop": stack(sizes, True, "loop"),
    }
    times = {name: [] for name in models}
    for model in models.values():
        run(model, x)  # warm-up
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            run(model, x)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["nn.LSTM"])
    result = {}
    for name, t in times.items():
        result[name] = {"median_s": statistics.median(t), "ratio": statistics.median(t) / base}
        print(
            f"{name:<16} {statistics.median(t) * 1e3:8.1f} ms   ratio to nn.LSTM "
            f"{statistics.median(t) / base:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"torch": torch.__version__, "threads": torch.get_num_threads(), "results": result},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
