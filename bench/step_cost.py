"""Time per training step of every method on the AWD-style LM, as ratios to DropoutK(1).

Methods are timed in the same process with interleaved repetitions (one step of each method per
round), so machine noise hits them alike; the median, min and max ratio to DropoutK(1) of the
same round are reported.

    python bench/step_cost.py --size small --repeats 5 --json docs/results/step_cost_small.json
"""

import argparse
import json
import platform
import statistics
import time

import torch

import dropsplit as ds
from dropsplit.models.awd import AWDLSTM, lm_forward

SIZES = {
    "small": {"embedding": 200, "hidden": 400, "bptt": 35, "batch": 20},
    "paper": {"embedding": 400, "hidden": 1150, "bptt": 70, "batch": 20},
}


def methods():
    out = {"DropoutK(1)": ds.DropoutK(1, seed=0), "NoDropout": ds.NoDropout(seed=0)}
    for k in (2, 4, 8):
        out[f"DropoutK({k}) loop"] = ds.DropoutK(k, seed=0)
        out[f"DropoutK({k}) batch"] = ds.DropoutK(k, implementation="batch", batch_dim=1, seed=0)
    out["DropoutK(4) + difference"] = ds.DropoutK(4, "difference", seed=0)
    out["DropoutK(4) + analytic"] = ds.DropoutK(4, "analytic", seed=0)
    for explicit in ("sampled", "label", "identity"):
        out[f"Analytic({explicit}, implicit)"] = ds.Analytic(explicit, True, seed=0)
        out[f"Analytic({explicit})"] = ds.Analytic(explicit, False, seed=0)
    out["Analytic(implicit only)"] = ds.Analytic(None, True, seed=0)
    fd = {"gradient": "finite-difference", "seed": 0}
    out["Analytic(sampled, implicit) FD"] = ds.Analytic("sampled", True, **fd)
    out["Analytic(sampled) FD"] = ds.Analytic("sampled", False, **fd)
    out["Analytic(label, implicit) FD"] = ds.Analytic("label", True, **fd)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="method names to time (default all)")
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = SIZES[args.size]
    torch.manual_seed(0)
    model = AWDLSTM(10_000, cfg["embedding"], cfg["hidden"], 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10_000, (cfg["bptt"], cfg["batch"]), generator=g)
    y = torch.randint(0, 10_000, (cfg["bptt"], cfg["batch"]), generator=g)
    batch = (x, y, model.init_state(cfg["batch"]))
    chosen = methods()
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only or k == "DropoutK(1)"}
    times = {name: [] for name in chosen}
    for method in chosen.values():  # warm-up
        method.step(model, lm_forward, batch)
    for _ in range(args.repeats):
        for name, method in chosen.items():
            start = time.perf_counter()
            method.step(model, lm_forward, batch)
            times[name].append(time.perf_counter() - start)
    base = times["DropoutK(1)"]
    rows = {}
    print(f"{'method':<28} {'median s':>9} {'ratio med':>9} {'min':>6} {'max':>6}")
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, base, strict=True)]
        rows[name] = {
            "median_s": statistics.median(t),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        r = rows[name]
        print(
            f"{name:<28} {r['median_s']:9.3f} {r['ratio_median']:9.2f} {r['ratio_min']:6.2f} "
            f"{r['ratio_max']:6.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "config": cfg,
                    "repeats": args.repeats,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine(),
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
