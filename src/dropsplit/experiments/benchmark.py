"""Time and peak memory per training step of every method, as ratios to DropoutK(1).

``dropsplit bench`` (or ``python bench/step_cost.py``) times the AWD-style LM at the issue's two
sizes (``small``, ``paper``) and at the character-level suite's size (``char``). Methods are
timed in the same process with interleaved repetitions (one step of each method per round), so
machine noise hits them alike; the median, min and max ratio to DropoutK(1) of the same round
are reported. Peak memory is the rise of the resident set size over two steps after a warm-up
step, polled every 0.5 ms, in a fresh process per method with glibc returning freed blocks over
64 KiB to the OS (so the resident set follows live memory; CPU), or the rise of
``torch.cuda.max_memory_allocated`` (CUDA). A reference row trains the same model built from
``nn.LSTM`` with plain dropout.

    dropsplit bench --size small --repeats 5 --json docs/results/step_cost_small.json \
        --markdown docs/results/step_cost_small.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from torch import nn

import dropsplit as ds
from dropsplit.experiments.reference_models import PlainAWD, PlainQRNN, PlainTransformer
from dropsplit.models.awd import AWDLSTM, QRNNLM, column_examples, lm_forward
from dropsplit.models.transformer import TransformerLM

SIZES = {
    "small": {
        "vocab": 10_000,
        "embedding": 200,
        "hidden": 400,
        "layers": 3,
        "bptt": 35,
        "batch": 20,
    },
    "paper": {
        "vocab": 10_000,
        "embedding": 400,
        "hidden": 1150,
        "layers": 3,
        "bptt": 70,
        "batch": 20,
    },
    # the character-level suite (configs/paper/base-char.toml)
    "char": {"vocab": 50, "embedding": 64, "hidden": 256, "layers": 2, "bptt": 70, "batch": 20},
}
# the Transformer at each size: width, MLP width, blocks, heads (as in the configs
# paper/base-char-transformer.toml for "char" and ptb-small-transformer.toml for "small")
TRANSFORMER_SIZES = {
    "small": (200, 800, 3, 4),
    "paper": (400, 1600, 3, 8),
    "char": (64, 256, 2, 4),
}
MODELS = ("lstm", "qrnn", "transformer")
REFERENCES = {
    "lstm": "nn.LSTM + plain dropout (reference)",
    "qrnn": "loop QRNN + plain dropout (reference)",
    "transformer": "nn.TransformerEncoder + plain dropout (reference)",
}


def methods(batch_size: int) -> dict[str, ds.Method]:
    """Every method of the benchmark, by row name."""
    out = {"DropoutK(1)": ds.DropoutK(1, seed=0), "NoDropout": ds.NoDropout(seed=0)}
    for k in (2, 4, 8):
        out[f"DropoutK({k}) loop"] = ds.DropoutK(k, seed=0)
        out[f"DropoutK({k}) batch"] = ds.DropoutK(k, implementation="batch", seed=0)
    out["DropoutK(4) + difference"] = ds.DropoutK(4, "difference", seed=0)
    out["DropoutK(4) + analytic"] = ds.DropoutK(4, "analytic", seed=0)
    for explicit in ("sampled", "label", "identity"):
        out[f"Analytic({explicit}, implicit)"] = ds.Analytic(explicit, True, seed=0)
        out[f"Analytic({explicit})"] = ds.Analytic(explicit, False, seed=0)
    out["Analytic(implicit only)"] = ds.Analytic(None, True, seed=0)
    examples = column_examples(batch_size)
    fd = partial(ds.Analytic, gradient=ds.FiniteDifference(examples=examples), seed=0)
    for explicit, implicit in (("sampled", True), ("sampled", False), ("label", True)):
        tag = f"{explicit}, implicit" if implicit else explicit
        out[f"Analytic({tag}) FD"] = fd(explicit, implicit)
    out["Analytic(implicit only) FD"] = fd(None, True)
    out["Analytic(sampled, implicit) FD one slope"] = ds.Analytic(
        "sampled", True, gradient="finite-difference", seed=0
    )
    hvp = partial(ds.Analytic, gradient="hvp-difference", seed=0)
    out["Analytic(sampled, implicit) HVP"] = hvp("sampled", True)
    out["Analytic(sampled) HVP"] = hvp("sampled", False)
    out["Analytic(implicit only) HVP"] = hvp(None, True)
    out["Analytic(sampled, implicit) JVP"] = ds.Analytic("sampled", True, gradient="jvp", seed=0)
    out["DropoutK(4) + analytic HVP"] = ds.DropoutK(
        4, "analytic", gradient="hvp-difference", seed=0
    )
    out["RDrop(0.5)"] = ds.RDrop(0.5, seed=0)
    out["Fraternal(0.25)"] = ds.Fraternal(0.25, seed=0)
    return out


def build(size: str, model: str = "lstm") -> AWDLSTM | QRNNLM | TransformerLM:
    """The language model ``model`` at ``size`` (default sites: q = 0.4, Transformer 0.2)."""
    cfg = SIZES[size]
    torch.manual_seed(0)
    sizes = (cfg["vocab"], cfg["embedding"], cfg["hidden"], cfg["layers"])
    if model == "qrnn":
        return QRNNLM(*sizes)
    if model == "transformer":
        width, mlp, blocks, heads = TRANSFORMER_SIZES[size]
        return TransformerLM(
            cfg["vocab"],
            width,
            blocks,
            heads,
            2 * cfg["bptt"],
            mlp,
            p_input=0.2,
            p_attention=0.2,
            p_attn_out=0.2,
            p_mlp_hidden=0.2,
            p_mlp_out=0.2,
            p_output=0.0,
        )
    return AWDLSTM(*sizes)


def reference(lm: nn.Module) -> nn.Module:
    """The same model written the obvious way, with plain dropout."""
    if isinstance(lm, QRNNLM):
        return PlainQRNN(lm)
    if isinstance(lm, TransformerLM):
        return PlainTransformer(lm)
    return PlainAWD(cast(AWDLSTM, lm))


def problem(size: str, device: str = "cpu", model: str = "lstm"):
    """The model and one batch of the given size."""
    cfg = SIZES[size]
    vocab = cfg["vocab"]
    lm = build(size, model).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (cfg["bptt"], cfg["batch"]), generator=g).to(device)
    y = torch.randint(0, vocab, (cfg["bptt"], cfg["batch"]), generator=g).to(device)
    return lm, (x, y, lm.init_state(cfg["batch"]))


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def steps(
    size: str, device: str = "cpu", model: str = "lstm", autocast: str | None = None
) -> dict[str, Callable[[], object]]:
    """One training step (forward, backward, gradients written) per row name.

    ``autocast`` (``"bf16"`` or ``"fp16"``): every step, the reference's too, runs inside
    ``torch.autocast`` with that dtype (the parameters stay float32).
    """
    lm, batch = problem(size, device, model)
    device_type = torch.device(device).type

    def mixed() -> contextlib.AbstractContextManager:
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=AUTOCAST[autocast])

    def method_step(method: ds.Method) -> object:
        lm.zero_grad(set_to_none=True)  # step() adds to p.grad; the reference sets it anew
        with mixed():
            return method.step(lm, lm_forward, batch)

    out: dict[str, Callable[[], object]] = {
        name: partial(method_step, m) for name, m in methods(SIZES[size]["batch"]).items()
    }
    plain = reference(lm).to(device)
    x, y, _ = batch

    def plain_step():
        for p in plain.parameters():
            p.grad = None
        with mixed():
            loss = nn.functional.cross_entropy(plain(x).flatten(0, 1).float(), y.reshape(-1))
        loss.backward()

    out[REFERENCES[model]] = plain_step
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(
    size: str,
    repeats: int,
    only=None,
    device: str = "cpu",
    model: str = "lstm",
    autocast: str | None = None,
) -> dict[str, dict]:
    """Interleaved timing: ratios to DropoutK(1) of the same round."""
    chosen = steps(size, device, model, autocast)
    if only:
        chosen = {k: v for k, v in chosen.items() if k in only or k == "DropoutK(1)"}
    times: dict[str, list[float]] = {name: [] for name in chosen}
    for step in chosen.values():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in chosen.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    base = times["DropoutK(1)"]
    rows = {}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, base, strict=True)]
        rows[name] = {
            "median_s": statistics.median(t),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_peak_memory(size: str, name: str, device: str = "cpu", model: str = "lstm") -> float:
    """Peak memory (MiB) two steps of ``name`` add to the process, measured in this process."""
    step = steps(size, device, model)[name]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    step()  # first-call allocations (thread pools, kernels) are not the step's
    gc.collect()
    before = _rss_bytes()
    peaks = rss_peaks(lambda: (step(), step()))
    return (max(before, *peaks.values()) - before) / 2**20


def rss_peaks(run: Callable[[], Any], label: Callable[[], str] = lambda: "run") -> dict[str, int]:
    """The highest resident set (bytes) while ``run()`` runs, per ``label()`` when polled.

    The kernel's high-water mark cannot be reset, so the resident set is polled every 0.5 ms
    from a thread; ``label`` lets a caller tag phases (``bench/memory_phases.py``).
    """
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, key = _rss_bytes(), label()
            peaks[key] = max(peaks.get(key, 0), rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return peaks


def memory_rows(size: str, names, device: str = "cpu", model: str = "lstm") -> dict[str, float]:
    """Peak step memory per method, each in a fresh process (the high-water mark is global)."""
    out = {}
    # large blocks go straight back to the OS when freed, so the resident set follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for name in names:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dropsplit.experiments.benchmark",
                "--size",
                size,
                "--device",
                device,
                "--model",
                model,
                "--memory-of",
                name,
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def markdown(rows: dict[str, dict], memory: dict[str, float] | None) -> str:
    """The rows as a markdown table."""
    head = "| method | median s/step | ratio (median) | min | max |"
    rule = "|---|---:|---:|---:|---:|"
    if memory:
        head += " peak step memory MiB | memory ratio |"
        rule += "---:|---:|"
    lines = [head, rule]
    for name, r in rows.items():
        line = (
            f"| {name} | {r['median_s']:.3f} | {r['ratio_median']:.2f} | {r['ratio_min']:.2f} | "
            f"{r['ratio_max']:.2f} |"
        )
        if memory:
            m = memory.get(name)
            base = memory.get("DropoutK(1)")
            line += f" {m:.0f} | {m / base:.2f} |" if m is not None and base else " | |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def memory_only(args: argparse.Namespace) -> None:
    """``--memory-only``: the peak step memory of each row, printed (and written to --json)."""
    names = [
        n
        for n in steps(args.size, args.device, args.model)
        if not args.only or n in args.only or n == "DropoutK(1)"
    ]
    memory = memory_rows(args.size, names, args.device, args.model)
    for name, mib in memory.items():
        print(f"{name:<44} {mib:8.0f} MiB  {mib / memory['DropoutK(1)']:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "model": args.model,
                    "device": args.device,
                    "peak_mib": memory,
                },
                f,
            )


def main(argv: list[str] | None = None) -> int:
    """Command line of ``dropsplit bench``."""
    parser = argparse.ArgumentParser(prog="dropsplit bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="model size (default small), batch 20: small (3 layers, embedding 200, hidden 400, "
        "bptt 35, vocabulary 10,000), paper (3 layers, embedding 400, hidden 1150, bptt 70, "
        "vocabulary 10,000), char (the character-level suites': 2 layers, embedding 64, hidden "
        "256, bptt 70, vocabulary 50)",
    )
    parser.add_argument(
        "--model", choices=MODELS, default="lstm", help="language model timed (default lstm)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds of one step of every method (default 5); ratios are medians over them",
    )
    parser.add_argument("--only", nargs="*", help="row names to time (default all)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default cuda when available)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory column")
    parser.add_argument("--memory-only", action="store_true", help="only the memory column")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--markdown", help="write the table to this markdown file")
    parser.add_argument(
        "--autocast",
        choices=sorted(AUTOCAST),
        help="time every step inside torch.autocast with this dtype (timing only: memory "
        "is measured without it)",
    )
    args = parser.parse_args(argv)
    if args.autocast and not (args.no_memory or args.memory_of):
        parser.error("--autocast times steps only: add --no-memory")
    if args.memory_of:
        peak_mib = step_peak_memory(args.size, args.memory_of, args.device, args.model)
        print(json.dumps({"peak_mib": peak_mib}))
        return 0
    if args.memory_only:
        memory_only(args)
        return 0
    rows = time_steps(args.size, args.repeats, args.only, args.device, args.model, args.autocast)
    peak = None if args.no_memory else memory_rows(args.size, rows, args.device, args.model)
    table = markdown(rows, peak)
    print(table)
    info = {
        "size": args.size,
        "model": args.model,
        "config": SIZES[args.size],
        "repeats": args.repeats,
        "device": args.device,
        "autocast": args.autocast,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "command": "dropsplit bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": {k: {**v, "peak_mib": (peak or {}).get(k)} for k, v in rows.items()},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
