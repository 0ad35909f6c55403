"""Train the AWD-style LM with any method: checkpoints, exact resume, NT-ASGD, DDP.

A run directory holds ``config.toml`` (resolved), ``metrics.jsonl`` (one object per evaluation),
``checkpoint.pt`` (everything needed to continue exactly: weights, optimizer, averaged weights,
the method's generator, RNG states, the position in the epoch and the recurrent state),
``best.pt`` (weights at the best validation loss) and ``summary.json``. Every file is written
atomically (temporary file + rename), so a killed run resumes from its last checkpoint as if it
had never stopped. Under ``torchrun`` each process trains on its own columns of the batch and
DDP averages the gradients in the method's single outer backward.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dropsplit as ds
from dropsplit.data import Corpus, batchify, bptt_batches, load_corpus
from dropsplit.methods import Method
from dropsplit.models.awd import AWDLSTM, detach_state, lm_forward, sequence_examples
from dropsplit.training.config import Config, MethodConfig, OptimConfig, to_dict, to_toml


def build_method(cfg: MethodConfig, seed: int) -> Method:
    """The gradient maker a config names (non-finite objectives are reported, not raised)."""
    common = {"seed": seed, "nonfinite": "warn"}
    if cfg.name == "none":
        return ds.NoDropout(**common)
    if cfg.name == "dropout":
        # the analytic noise has no finite-difference form: it is exact or HVP differences
        gradient = "double-backward" if cfg.gradient == "finite-difference" else cfg.gradient
        return ds.DropoutK(
            cfg.k,
            None if cfg.noise == "none" else cfg.noise,
            implementation=cfg.implementation,
            batch_dim=1,
            grouping=cfg.grouping,
            gradient=gradient,
            hvp_step=cfg.hvp_step,
            **common,
        )
    return ds.Analytic(
        None if cfg.explicit == "none" else cfg.explicit,
        cfg.implicit,
        explicit_scale=cfg.explicit_scale,
        implicit_scale=cfg.implicit_scale,
        grouping=cfg.grouping,
        gradient=cfg.gradient,
        fd_epsilon=cfg.fd_epsilon,
        hvp_step=cfg.hvp_step,
        fd_examples=sequence_examples if cfg.fd_per_example else None,
        **common,
    )


def build_model(config: Config, vocab_size: int) -> AWDLSTM:
    """The AWD-style LM of a config."""
    m = config.model
    return AWDLSTM(
        vocab_size,
        m.embedding_size,
        m.hidden_size,
        m.layers,
        p_input=m.p_input,
        p_hidden=m.p_hidden,
        p_output=m.p_output,
        p_weight=m.p_weight,
        p_embedding=m.p_embedding,
        tie_weights=m.tie_weights,
        implementation=m.implementation,
    )


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """SGD (also the first phase of NT-ASGD), Adam or AdamW."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Averager:
    """Iterate averaging of NT-ASGD (AWD-LSTM), kept in our own state.

    Averaging starts when the validation loss is worse than the best of all but the last
    ``nonmono`` evaluations; from then on ``avg = mean of the iterates`` and evaluation uses it.
    """

    def __init__(self, params: list[nn.Parameter], nonmono: int) -> None:
        self.params = params
        self.nonmono = nonmono
        self.active = False
        self.count = 0
        self.average: list[torch.Tensor] = []

    def maybe_start(self, history: list[float]) -> bool:
        """Switch averaging on by the non-monotone criterion; True when it switched now."""
        if self.active or len(history) <= self.nonmono:
            return False
        if history[-1] > min(history[: -self.nonmono]):
            self.active = True
            self.count = 0
            self.average = [p.detach().clone() for p in self.params]
            return True
        return False

    def update(self) -> None:
        """Add the current iterate to the average."""
        if not self.active:
            return
        self.count += 1
        with torch.no_grad():
            for a, p in zip(self.average, self.params, strict=True):
                a.add_(p.detach() - a, alpha=1.0 / (self.count + 1))

    def swap(self) -> None:
        """Exchange the parameters with the average (call twice to undo)."""
        if not self.active:
            return
        with torch.no_grad():
            for a, p in zip(self.average, self.params, strict=True):
                tmp = p.detach().clone()
                p.copy_(a)
                a.copy_(tmp)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only."""
        return {"active": self.active, "count": self.count, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.active, self.count = state["active"], state["count"]
        self.average = [a.clone() for a in state["average"]]


def evaluate(model: AWDLSTM, data: torch.Tensor, bptt: int, max_batches: int = 0) -> float:
    """Token-mean negative log-likelihood of ``data`` (``[T, B]``), sites off."""
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, model.init_state(data.shape[1])
    with torch.no_grad():
        for n, (_, x, y) in enumerate(bptt_batches(data, bptt)):
            if max_batches and n >= max_batches:
                break
            logits, state = model(x, state)
            total += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                )
            )
            count += y.numel()
    model.train(was_training)
    return total / count


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda p: torch.save(obj, p))


def save_json(obj: Any, path: Path) -> None:
    """JSON atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def flatten_state(state) -> list[torch.Tensor]:
    """A per-layer ``((h, c), ...)`` state as a flat list (checkpoint friendly)."""
    return [] if state is None else [t for pair in state for t in pair]


def unflatten_state(flat: list[torch.Tensor]):
    """Inverse of :func:`flatten_state`."""
    return None if not flat else tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


@dataclass
class Progress:
    """Everything about the loop's position that a checkpoint must carry."""

    epoch: int = 1
    step: int = 0
    position: int = 0
    best_val: float = math.inf
    val_history: list[float] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0
    stat_sums: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    loss_ema: float = 0.0
    train_seconds: float = 0.0
    train_tokens: int = 0
    evaluated_step: int = -1


def distributed() -> tuple[int, int]:
    """``(rank, world_size)``, initialising the process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def diverged(loss: float, progress: Progress, factor: float) -> bool:
    """Non-finite, or above ``factor`` times the running mean of recent losses."""
    if not math.isfinite(loss):
        return True
    return progress.step >= 10 and loss > factor * progress.loss_ema


def train(
    config: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    dry_run: bool = False,
    corpus: Corpus | None = None,
    interrupt_at_step: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and checkpoint; returns the summary.

    Args:
        config: The experiment.
        out_dir: Run directory.
        resume: Continue from ``out_dir/checkpoint.pt`` if it exists.
        dry_run: Stop after 3 steps with a shortened evaluation.
        corpus: A preloaded corpus (default: loaded from the config).
        interrupt_at_step: Raise ``KeyboardInterrupt`` after this step (tests of resumption).
        show_progress: Show a progress bar (on a terminal).

    Returns:
        The contents of ``summary.json``.
    """
    rank, world = distributed()
    out = Path(out_dir)
    checkpoint_path = out / "checkpoint.pt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and checkpoint_path.exists():
            raise FileExistsError(f"{out} already holds a run; pass --resume or another --out")
    d, tc = config.data, config.train
    device = torch.device(tc.device)
    torch.manual_seed(tc.seed)
    corpus = corpus or load_corpus(d.corpus, d.path or None, d.train_fraction)
    columns = batchify(corpus.train, d.batch_size * world)
    train_data = columns[:, rank * d.batch_size : (rank + 1) * d.batch_size].to(device)
    valid_data = batchify(corpus.valid, d.eval_batch_size).to(device)
    test_data = batchify(corpus.test, d.test_batch_size).to(device)
    model = build_model(config, len(corpus.vocab)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    method = build_method(config.method, tc.seed + 1000 * rank)
    optimizer = build_optimizer(config.optim, params)
    averager = Averager(params, config.optim.nonmono)
    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model)
    bptt_gen = torch.Generator().manual_seed(tc.seed + 1)
    max_steps = 3 if dry_run else tc.max_steps
    progress, state = Progress(), None

    def load_weights() -> dict[str, Any]:
        """Weights, optimizer and averages of the last checkpoint; returns the checkpoint."""
        ckpt = torch.load(checkpoint_path, weights_only=True, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        averager.load_state_dict(ckpt["averager"])
        return ckpt

    if resume and checkpoint_path.exists():
        ckpt = load_weights()
        method.load_state_dict(ckpt["method"])
        bptt_gen.set_state(ckpt["bptt_generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = unflatten_state(ckpt["state"])
        progress = Progress(**ckpt["progress"])
        if rank != 0:
            own = torch.load(out / f"rank{rank}.pt", weights_only=True, map_location=device)
            method.load_state_dict(own["method"])
            state = unflatten_state(own["state"])
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", progress.step)
    elif rank == 0:
        atomic_write(out / "config.toml", lambda p: p.write_text(to_toml(config)))

    def checkpoint() -> None:
        if rank != 0:  # each rank has its own masks and recurrent state
            save_torch(
                {"method": method.state_dict(), "state": flatten_state(state)},
                out / f"rank{rank}.pt",
            )
            return
        save_torch(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "method": method.state_dict(),
                "averager": averager.state_dict(),
                "bptt_generator": bptt_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "state": flatten_state(state),
                "progress": progress.__dict__,
            },
            checkpoint_path,
        )

    def run_eval() -> float:
        averager.swap()
        val = evaluate(model, valid_data, d.bptt, 2 if dry_run else tc.max_eval_batches)
        if val < progress.best_val and rank == 0:
            save_torch(model.state_dict(), out / "best.pt")
        averager.swap()
        progress.best_val = min(progress.best_val, val)
        progress.val_history.append(val)
        progress.evaluated_step = progress.step
        if config.optim.name == "ntasgd" and averager.maybe_start(progress.val_history):
            _log(rank, f"step {progress.step}: NT-ASGD starts averaging")
        record = {
            "step": progress.step,
            "epoch": progress.epoch,
            "train_loss": progress.loss_sum / max(progress.loss_count, 1),
            "val_loss": val,
            "val_ppl": math.exp(min(val, 50.0)),
            "lr": config.optim.lr,
            "averaging": averager.active,
            "skipped": progress.skipped,
            "seconds": progress.train_seconds,
            "tokens_per_second": progress.train_tokens / max(progress.train_seconds, 1e-9),
        }
        record.update({k: v / max(progress.loss_count, 1) for k, v in progress.stat_sums.items()})
        if rank == 0:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        progress.loss_sum, progress.loss_count, progress.stat_sums = 0.0, 0, {}
        return val

    per_epoch = max(1, (train_data.shape[0] - 1) // d.bptt)
    total = min(tc.epochs * per_epoch, max_steps) if max_steps else tc.epochs * per_epoch
    bar = _progress_bar(total, progress.step, disable=rank != 0 or not show_progress)

    def patience_spent() -> bool:  # early stopping: no better validation for `patience` evals
        history = progress.val_history
        # never before `min_epochs`: a run can sit on its initial plateau for dozens of epochs
        if not tc.patience or not history or progress.epoch - 1 < tc.min_epochs:
            return False
        return len(history) - 1 - history.index(min(history)) >= tc.patience

    while (
        progress.epoch <= tc.epochs
        and not (max_steps and progress.step >= max_steps)
        and not patience_spent()
    ):
        windows = bptt_batches(train_data, d.bptt, d.variable_bptt, bptt_gen, progress.position)
        for start, x, y in windows:
            tick = time.perf_counter()
            if state is None:
                state = model.init_state(d.batch_size)
            if config.optim.name not in ("adam", "adamw"):  # AWD: lr scales with the window length
                for group in optimizer.param_groups:
                    group["lr"] = config.optim.lr * x.shape[0] / d.bptt
            result = method.step(trained, lm_forward, (x, y, state))
            progress.step += 1
            progress.position = start + x.shape[0]
            if not result.finite or diverged(result.loss, progress, tc.divergence_factor):
                progress.skipped += 1
                warnings.warn(
                    f"step {progress.step}: loss {result.loss:.4g} diverged; "
                    + ("step skipped" if tc.divergence == "skip" else "last checkpoint restored"),
                    RuntimeWarning,
                    stacklevel=2,
                )
                if tc.divergence == "restore" and checkpoint_path.exists():
                    load_weights()
                state = None
            else:
                if config.optim.clip > 0:
                    nn.utils.clip_grad_norm_(params, config.optim.clip)
                optimizer.step()
                averager.update()
                state = detach_state(result.aux)
                progress.loss_sum += result.loss
                progress.loss_count += 1
                for key in ("explicit", "implicit", "noise"):
                    if key in result.stats:
                        progress.stat_sums[key] = (
                            progress.stat_sums.get(key, 0.0) + result.stats[key]
                        )
                progress.loss_ema = (
                    result.loss
                    if progress.step == 1
                    else 0.9 * progress.loss_ema + 0.1 * result.loss
                )
            progress.train_seconds += time.perf_counter() - tick
            progress.train_tokens += x.numel() * world
            bar.update(1)
            if progress.step % tc.log_every == 0:
                bar.set_postfix(epoch=progress.epoch, loss=f"{result.loss:.3f}")
            if tc.eval_every and progress.step % tc.eval_every == 0:
                run_eval()
            if progress.step % tc.checkpoint_every == 0:
                checkpoint()
            if interrupt_at_step is not None and progress.step >= interrupt_at_step:
                raise KeyboardInterrupt(f"interrupted after step {progress.step}")
            if max_steps and progress.step >= max_steps:
                break
        else:
            if progress.evaluated_step != progress.step:  # every epoch ends with an evaluation
                run_eval()
            progress.epoch += 1
            progress.position = 0
            state = None
            checkpoint()
            continue
        break
    if progress.evaluated_step != progress.step:
        run_eval()
    if patience_spent():
        _log(rank, f"epoch {progress.epoch - 1}: no better validation for {tc.patience} epochs")
    checkpoint()
    bar.close()
    summary = _summary(config, model, out, test_data, progress, dry_run, device)
    if rank == 0:
        save_json(summary, out / "summary.json")
    return summary


def _summary(config, model, out, test_data, progress, dry_run, device) -> dict[str, Any]:
    best = out / "best.pt"
    if best.exists():
        model.load_state_dict(torch.load(best, weights_only=True, map_location=device))
    test = evaluate(model, test_data, config.data.bptt, 2 if dry_run else 0)
    best_val = progress.best_val
    return {
        "config": to_dict(config),
        "best_val_loss": best_val,
        "best_val_ppl": math.exp(min(best_val, 50.0)),
        "test_loss": test,
        "test_ppl": math.exp(min(test, 50.0)),
        "epochs": progress.epoch - 1,
        "steps": progress.step,
        "skipped_steps": progress.skipped,
        "train_seconds": progress.train_seconds,
        "seconds_per_step": progress.train_seconds / max(progress.step, 1),
        "tokens_per_second": progress.train_tokens / max(progress.train_seconds, 1e-9),
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop evaluations logged after the checkpoint we resume from."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    atomic_write(path, lambda p: p.write_text("".join(ln + "\n" for ln in lines)))


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, disable: bool):
    """A tqdm bar over steps on a terminal; nothing otherwise (or without tqdm)."""
    if disable or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
