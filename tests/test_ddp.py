"""DDP with 2 gloo processes: gradients equal the mean of the per-process gradients."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dropsplit as ds
from dropsplit.models.awd import AWDLSTM, QRNNLM, lm_forward
from dropsplit.models.transformer import TransformerLM

METHODS = {
    "none": lambda seed: ds.NoDropout(seed=seed),
    "dropout-2": lambda seed: ds.DropoutK(2, seed=seed),
    "dropout-2-batch": lambda seed: ds.DropoutK(2, implementation="batch", seed=seed),
    "difference": lambda seed: ds.DropoutK(2, "difference", seed=seed),
    "analytic-noise": lambda seed: ds.DropoutK(2, "analytic", seed=seed),
    "analytic": lambda seed: ds.Analytic(seed=seed),
    "analytic-label": lambda seed: ds.Analytic("label", False, seed=seed),
    "rdrop": lambda seed: ds.RDrop(0.5, seed=seed),
    "fraternal": lambda seed: ds.Fraternal(0.25, seed=seed),
}


MODELS = {
    "lstm": lambda: AWDLSTM(11, 4, 5, 2, p_embedding=0.1, implementation="loop"),
    "qrnn": lambda: QRNNLM(11, 4, 5, 2, p_embedding=0.1),
    "transformer": lambda: TransformerLM(11, 4, 1, 2, 8, mlp_width=6, p_output=0.1),
}


def make_model(name="lstm"):
    torch.manual_seed(0)
    return MODELS[name]()


def rank_batch(model, rank):
    g = torch.Generator().manual_seed(100 + rank)
    return (
        torch.randint(0, 11, (5, 3), generator=g),
        torch.randint(0, 11, (5, 3), generator=g),
        model.init_state(3),
    )


def worker(rank, world, init_file, out_dir):
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grads = {}
    for model_name in MODELS:
        model = make_model(model_name)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for name, make in METHODS.items():
            ddp.zero_grad(set_to_none=True)  # step() adds to p.grad
            make(seed=10 + rank).step(ddp, lm_forward, rank_batch(model, rank))
            grads[f"{model_name}/{name}"] = [p.grad.clone() for p in model.parameters()]
    torch.save(grads, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_gradients_equal_the_mean_of_per_process_gradients(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ddp[0]:
        model_name, name = key.split("/")
        reference = []
        for rank in range(2):
            model = make_model(model_name)
            METHODS[name](seed=10 + rank).step(model, lm_forward, rank_batch(model, rank))
            reference.append([p.grad.clone() for p in model.parameters()])
        for i, (a, b) in enumerate(zip(*reference, strict=True)):
            mean = (a + b) / 2
            for rank in range(2):
                assert torch.allclose(ddp[rank][key][i], mean, rtol=1e-9, atol=1e-12), key


# deterministic objectives: micro-batches weighted by their share of the targets add up exactly
ACCUMULATED = {
    "none": lambda: ds.NoDropout(),
    "analytic-exact": lambda: ds.Analytic("exact", implicit=False),
}


def accumulation_worker(rank, world, init_file, out_dir):
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grads = {}
    for name, make in ACCUMULATED.items():
        model = make_model("lstm")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y, state = rank_batch(model, rank)  # [5, 3]: 15 targets
        make().step(ddp, lm_forward, (x, y, state))
        whole = [p.grad.clone() for p in model.parameters()]
        ddp.zero_grad(set_to_none=True)
        method = make()
        with ddp.no_sync():  # the first micro-batch (one column: 5 of 15 targets) stays local
            method.step(
                ddp, lm_forward, (x[:, :1], y[:, :1], model.init_state(1)), backward=_scaled(1 / 3)
            )
        method.step(
            ddp, lm_forward, (x[:, 1:], y[:, 1:], model.init_state(2)), backward=_scaled(2 / 3)
        )
        grads[name] = (whole, [p.grad.clone() for p in model.parameters()])
    torch.save(grads, Path(out_dir) / f"accumulated{rank}.pt")
    dist.destroy_process_group()


def _scaled(weight):
    return lambda t: (weight * t).backward()


def test_ddp_no_sync_accumulation_equals_the_whole_batch(tmp_path):
    init = str(tmp_path / "init")
    mp.spawn(accumulation_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for name, (whole, accumulated) in torch.load(
            tmp_path / f"accumulated{rank}.pt", weights_only=True
        ).items():
            for a, b in zip(accumulated, whole, strict=True):
                assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


def test_no_dropout_ddp_equals_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "rank0.pt", weights_only=True)["lstm/none"]
    model = make_model()
    b0, b1 = rank_batch(model, 0), rank_batch(model, 1)
    batch = (torch.cat([b0[0], b1[0]], 1), torch.cat([b0[1], b1[1]], 1), model.init_state(6))
    ds.NoDropout().step(model, lm_forward, batch)
    for a, p in zip(ddp, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "method",
    ["method.name=dropout", "method.name=analytic", "model.name=transformer", "model.name=qrnn"],
)
def test_torchrun_trains_with_two_processes(tmp_path, method):
    root = Path(__file__).parents[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: test workers may run two of these at once
        "--nproc_per_node",
        "2",
        "-m",
        "dropsplit",
        "train",
        str(root / "configs" / "synthetic-tiny.toml"),
        "--set",
        "train.max_steps=4",
        "--set",
        method,
        "--out",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("best valid ppl") == 1  # printed once, not per rank
    assert (tmp_path / "run" / "summary.json").exists()
    assert (tmp_path / "run" / "rank1.pt").exists()
