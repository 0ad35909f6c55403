"""Wall time of the commands with 1 and 2 intra-op threads, on idle cores and beside a competitor.

The table behind the thread rule of ``dropsplit.training.threads`` (BENCHMARKS.md, "Threads").
Each command runs as its own process (``--threads N``) once per setting; "loaded" runs it beside
a competing process that keeps two threads busy with matrix products (another job on a shared
host). Commands: ``train`` (150 steps of the character-level suite's LSTM, 0.4M parameters),
``eval`` and ``measure`` of the run it trained, the quick reproduction cut to 150 steps a run
(``reproduce --quick --jobs 2``: two runs at once, the setting is threads per run) and ``train``
of the paper's word-level AWD-LSTM size (embedding 400, 3 layers of 1150: 24M parameters) for
6 steps.

    DROPSPLIT_DATA=../shared/data python bench/threads.py --out bench/results/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAR = ROOT / "configs" / "paper" / "base-char.toml"
WORD = ROOT / "configs" / "ptb-small.toml"
COMPETITOR = (
    "import torch\ntorch.set_num_threads(2)\na = torch.randn(800, 800)\nwhile True:\n a @ a"
)
SHORT = ["--set", "train.max_steps=150", "--set", "train.max_eval_batches=10"]


def commands(scratch: Path) -> dict[str, list[str]]:
    """Each measured ``dropsplit`` command line (the run of ``eval`` and ``measure`` included)."""
    run = str(scratch / "run")
    return {
        "train (0.4M, 150 steps)": ["train", str(CHAR), *SHORT, "--out", str(scratch / "t")],
        "eval --split valid": ["eval", run, "--split", "valid"],
        "measure (quick sizes)": [
            *("measure", run, "--batches", "1", "--gap-samples", "16", "--noise-samples", "8"),
            *("--out", str(scratch / "m"), "--overwrite"),
        ],
        "reproduce --quick --jobs 2 (150 steps a run)": [
            *("reproduce", "--quick", "--jobs", "2", "--no-measure", *SHORT),
            *("--out", str(scratch / "r")),
        ],
        "train (24M, 6 steps)": [
            *("train", str(WORD), "--set", "model.embedding_size=400"),
            *("--set", "model.hidden_size=1150", "--set", "train.max_steps=6"),
            *("--set", "train.max_eval_batches=1", "--out", str(scratch / "w")),
        ],
    }


def timed(argv: list[str]) -> float:
    """Seconds of one ``dropsplit`` process (a failure stops the benchmark)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    tick = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dropsplit", *argv], check=True, env=env, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - tick


def fresh(argv: list[str]) -> None:
    """Remove the output directory of a command that writes a run, so each timing trains anew."""
    if "--out" in argv and argv[0] in ("train", "reproduce"):
        shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dropsplit-threads-"))
    timed(["train", str(CHAR), *SHORT, "--out", str(scratch / "run"), "--threads", "1"])
    rows = []
    for load in ("idle", "loaded"):
        competitor = (
            subprocess.Popen([sys.executable, "-c", COMPETITOR]) if load == "loaded" else None
        )
        try:
            for name, argv in commands(scratch).items():
                seconds = {}
                for threads in (1, 2):
                    fresh(argv)
                    seconds[threads] = timed([*argv, "--threads", str(threads)])
                rows.append(
                    {"command": name, "load": load, **{f"{t}": s for t, s in seconds.items()}}
                )
                print(f"| {name} | {load} | {seconds[1]:.1f} | {seconds[2]:.1f} |", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "rows": rows}
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
