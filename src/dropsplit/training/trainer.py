"""Train the AWD-style LM with any method: checkpoints, exact resume, NT-ASGD, DDP.

A run directory holds ``config.toml`` (resolved), ``metrics.jsonl`` (one object per evaluation),
``checkpoint.pt`` (everything needed to continue exactly: weights, optimizer, averaged weights,
the method's generator, RNG states, the position in the epoch and the recurrent state),
``best.pt`` (weights at the best validation loss) and ``summary.json``. Every file is written
atomically (:mod:`~dropsplit.training.checkpoint`), so a killed run resumes from its last
checkpoint as if it had never stopped. Under ``torchrun`` each process trains on its own columns
of the batch and DDP averages the gradients in the method's single outer backward.

:class:`Trainer` holds one run: its parts come from :mod:`~dropsplit.training.build`, and its
step, evaluation and checkpoint are methods; :func:`train` runs one to the end.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dropsplit.data import Corpus, batchify, bptt_batches, load_corpus
from dropsplit.models import LanguageModel
from dropsplit.models.awd import detach_state, lm_forward
from dropsplit.training.build import build_method, build_model, build_optimizer
from dropsplit.training.checkpoint import (
    atomic_write,
    flatten_state,
    save_json,
    save_torch,
    truncate_metrics,
    unflatten_state,
)
from dropsplit.training.config import Config, check_resumable, to_dict, to_toml

STAT_KEYS = ("explicit", "implicit", "noise", "penalty")  # regularizer values averaged into metrics


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


def evaluate(
    model: LanguageModel,
    data: torch.Tensor,
    bptt: int,
    max_batches: int = 0,
    show_progress: bool = False,
) -> float:
    """Token-mean negative log-likelihood of ``data`` (``[T, B]``), sites off.

    ``show_progress``: a bar over the windows on a terminal (a full test set takes minutes).
    """
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, model.init_state(data.shape[1])
    windows = -(-(data.shape[0] - 1) // bptt)
    bar = _progress_bar(min(windows, max_batches or windows), 0, not show_progress, "window")
    with torch.no_grad():
        for n, (_, x, y) in enumerate(bptt_batches(data, bptt)):
            if max_batches and n >= max_batches:
                break
            bar.update(1)
            logits, state = model(x, state)
            total += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                )
            )
            count += y.numel()
    bar.close()
    model.train(was_training)
    return total / count


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
    explicit_ema: float = 0.0  # running mean of the explicit term, for the spike guard
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # process CPU time of the steps (CPU / wall shows contention)
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


def explicit_spike(explicit: float | None, progress: Progress, factor: float) -> bool:
    """The explicit term above ``factor`` times its running mean.

    One rare label of the sampled curvature can make one step's lambda R ten times its usual
    value; its gradient, although clipped, wrecks a recurrent model for good (docs/results/
    char-time/NOTES.md: R_approx + xi_approx, seed 1111, step 876: 2.79 against 0.18).
    """
    if explicit is None or progress.step < 10 or progress.explicit_ema <= 0:
        return False
    return explicit > factor * progress.explicit_ema


class Trainer:
    """One training run: its model, method, optimizer, data and position, and their checkpoint.

    Args:
        config: The experiment.
        out_dir: Run directory.
        resume: Continue from ``out_dir/checkpoint.pt`` (an error when there is none).
        overwrite: Delete the run already in ``out_dir`` and start again.
        dry_run: Stop after 3 steps with a shortened evaluation.
        corpus: A preloaded corpus (default: loaded from the config).
        show_progress: Show a progress bar (on a terminal).

    Raises:
        FileExistsError: If ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: If ``resume`` is set and ``out_dir`` holds no checkpoint.
        ValueError: For an ``out_dir`` that cannot be a run directory, a CUDA device that is not
            there, or a resume with a changed config.
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        *,
        resume: bool = False,
        dry_run: bool = False,
        corpus: Corpus | None = None,
        show_progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        self.rank, self.world = distributed()
        self.config, self.out, self.dry_run = config, Path(out_dir), dry_run
        self.checkpoint_path = self.out / "checkpoint.pt"
        d, tc = config.data, config.train
        if tc.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f'train.device="{tc.device}" but no CUDA device is available: '
                'set train.device="cpu"'
            )
        if self.rank == 0:
            self._prepare_directory(resume, overwrite)
        self.device = torch.device(tc.device)
        torch.manual_seed(tc.seed)
        corpus = corpus or load_corpus(d.corpus, d.path or None, d.train_fraction, d.download)
        columns = batchify(corpus.train, d.batch_size * self.world)
        rank_columns = slice(self.rank * d.batch_size, (self.rank + 1) * d.batch_size)
        self.train_data = columns[:, rank_columns].to(self.device)
        self.valid_data = batchify(corpus.valid, d.eval_batch_size).to(self.device)
        self.test_data = batchify(corpus.test, d.test_batch_size).to(self.device)
        self.model = build_model(config, len(corpus.vocab)).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.method = build_method(config.method, tc.seed + 1000 * self.rank, d.batch_size)
        self.optimizer = build_optimizer(config.optim, self.params)
        self.averager = Averager(self.params, config.optim.nonmono)
        self.trained: nn.Module = self.model
        if self.world > 1:
            self.trained = nn.parallel.DistributedDataParallel(self.model)
        self.bptt_gen = torch.Generator().manual_seed(tc.seed + 1)
        self.max_steps = 3 if dry_run else tc.max_steps
        self.progress = Progress()
        self.state: Any = None  # the model's recurrent state, carried across windows
        if resume:
            self.resume()
        if self.rank == 0:  # on resume, the keys that may change (check_resumable) are recorded
            atomic_write(self.out / "config.toml", lambda p: p.write_text(to_toml(config)))
        per_epoch = max(1, (self.train_data.shape[0] - 1) // d.bptt)
        total = tc.epochs * per_epoch
        total = min(total, self.max_steps) if self.max_steps else total
        self.bar = _progress_bar(
            total, self.progress.step, disable=self.rank != 0 or not show_progress
        )

    def _prepare_directory(self, resume: bool, overwrite: bool) -> None:
        """Create the run directory; refuse to replace a run (unless asked) or to resume nothing."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--out {self.out} cannot be a run directory: {err.strerror}") from err
        if not os.access(self.out, os.W_OK):
            raise ValueError(f"--out {self.out} is not writable")
        has_run = self.checkpoint_path.exists()
        if overwrite and not resume:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            for stale in self.out.glob("rank*.pt"):
                stale.unlink()
            has_run = False
        if resume and not has_run:
            raise FileNotFoundError(
                f"nothing to resume in {self.out} (no checkpoint.pt): run without --resume"
            )
        if not resume and has_run:
            raise FileExistsError(
                f"{self.out} already holds a run; pass --resume, --overwrite or another --out"
            )
        if resume:
            check_resumable(self.out / "config.toml", self.config)
        else:  # a run killed before its first checkpoint left lines that would be duplicated
            (self.out / "metrics.jsonl").unlink(missing_ok=True)

    def load_weights(self) -> dict[str, Any]:
        """Weights, optimizer and averages of the last checkpoint; returns the checkpoint."""
        ckpt = torch.load(self.checkpoint_path, weights_only=True, map_location=self.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.averager.load_state_dict(ckpt["averager"])
        return ckpt

    def resume(self) -> None:
        """Continue exactly where the last checkpoint left off (metrics after it are dropped)."""
        ckpt = self.load_weights()
        self.method.load_state_dict(ckpt["method"])
        self.bptt_gen.set_state(ckpt["bptt_generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.state = unflatten_state(ckpt["state"])
        self.progress = Progress(**ckpt["progress"])
        if self.rank != 0:
            own_path = self.out / f"rank{self.rank}.pt"
            own = torch.load(own_path, weights_only=True, map_location=self.device)
            self.method.load_state_dict(own["method"])
            self.state = unflatten_state(own["state"])
        if self.rank == 0:
            truncate_metrics(self.out / "metrics.jsonl", self.progress.step)

    def checkpoint(self) -> None:
        """Save everything needed to continue exactly (each rank its masks and state)."""
        if self.rank != 0:
            save_torch(
                {"method": self.method.state_dict(), "state": flatten_state(self.state)},
                self.out / f"rank{self.rank}.pt",
            )
            return
        save_torch(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(),
                "averager": self.averager.state_dict(),
                "bptt_generator": self.bptt_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "state": flatten_state(self.state),
                "progress": self.progress.__dict__,
            },
            self.checkpoint_path,
        )

    def evaluate(self) -> float:
        """Validate (on the averaged weights under NT-ASGD), keep the best, log one line."""
        config, progress, averager = self.config, self.progress, self.averager
        averager.swap()
        max_batches = 2 if self.dry_run else config.train.max_eval_batches
        val = evaluate(self.model, self.valid_data, config.data.bptt, max_batches)
        if val < progress.best_val and self.rank == 0:
            save_torch(self.model.state_dict(), self.out / "best.pt")
        averager.swap()
        progress.best_val = min(progress.best_val, val)
        progress.val_history.append(val)
        progress.evaluated_step = progress.step
        if config.optim.name == "ntasgd" and averager.maybe_start(progress.val_history):
            _log(self.rank, f"step {progress.step}: NT-ASGD starts averaging")
        count = max(progress.loss_count, 1)
        record = {
            "step": progress.step,
            "epoch": progress.epoch,
            "train_loss": progress.loss_sum / count,
            "val_loss": val,
            "val_ppl": math.exp(min(val, 50.0)),
            "lr": config.optim.lr,
            "averaging": averager.active,
            "skipped": progress.skipped,
            "seconds": progress.train_seconds,
            "cpu_seconds": progress.train_cpu_seconds,
            "tokens_per_second": progress.train_tokens / max(progress.train_seconds, 1e-9),
        }
        record.update({k: v / count for k, v in progress.stat_sums.items()})
        if self.rank == 0:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        progress.loss_sum, progress.loss_count, progress.stat_sums = 0.0, 0, {}
        return val

    def patience_spent(self) -> bool:
        """Early stopping: no better validation for ``patience`` evaluations."""
        tc, history = self.config.train, self.progress.val_history
        # never before `min_epochs`: a run can sit on its initial plateau for dozens of epochs
        if not tc.patience or not history or self.progress.epoch - 1 < tc.min_epochs:
            return False
        return len(history) - 1 - history.index(min(history)) >= tc.patience

    def step(self, start: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step of the method on window ``x -> y`` beginning at ``start``, guarded."""
        config, progress = self.config, self.progress
        tick, cpu_tick = time.perf_counter(), time.process_time()
        if self.state is None:
            self.state = self.model.init_state(config.data.batch_size)
        lr = config.optim.lr
        if 0 < config.optim.decay_after < progress.epoch:  # the paper's WikiText-103 QRNN schedule
            lr *= config.optim.lr_decay
        if config.optim.name not in ("adam", "adamw"):  # AWD: lr scales with the window length
            lr = lr * x.shape[0] / config.data.bptt  # in this order: the same floats as before
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)  # step() adds to p.grad
        result = self.method.step(self.trained, lm_forward, (x, y, self.state))
        progress.step += 1
        progress.position = start + x.shape[0]
        factor, explicit = config.train.divergence_factor, result.stats.get("explicit")
        if not result.finite or diverged(result.loss, progress, factor):
            self._skip(f"loss {result.loss:.4g} diverged")
        elif explicit_spike(explicit, progress, factor):
            self._skip(
                f"explicit term {explicit:.4g} > {factor} x its mean {progress.explicit_ema:.4g}"
            )
        else:
            if config.optim.clip > 0:
                nn.utils.clip_grad_norm_(self.params, config.optim.clip)
            self.optimizer.step()
            self.averager.update()
            self.state = detach_state(result.aux)
            progress.loss_sum += result.loss
            progress.loss_count += 1
            for key in STAT_KEYS:
                if key in result.stats:
                    progress.stat_sums[key] = progress.stat_sums.get(key, 0.0) + result.stats[key]
            progress.loss_ema = (
                result.loss if progress.step == 1 else 0.9 * progress.loss_ema + 0.1 * result.loss
            )
        if explicit is not None and math.isfinite(explicit):
            # on skipped steps too: a lasting rise (the term grows fast early in training) must
            # move the mean, or every later step would be skipped
            progress.explicit_ema = (
                0.9 * progress.explicit_ema + 0.1 * explicit
                if progress.explicit_ema > 0
                else explicit
            )
        progress.train_seconds += time.perf_counter() - tick
        progress.train_cpu_seconds += time.process_time() - cpu_tick
        progress.train_tokens += x.numel() * self.world
        self.bar.update(1)
        if progress.step % config.train.log_every == 0:
            self.bar.set_postfix(epoch=progress.epoch, loss=f"{result.loss:.3f}")

    def _skip(self, reason: str) -> None:
        """The divergence guard: count the step, warn, and skip it or restore the checkpoint."""
        restore = self.config.train.divergence == "restore"
        self.progress.skipped += 1
        warnings.warn(
            f"step {self.progress.step}: {reason}; "
            + ("last checkpoint restored" if restore else "step skipped"),
            RuntimeWarning,
            stacklevel=3,
        )
        if restore and self.checkpoint_path.exists():
            self.load_weights()
        self.state = None

    def run_epoch(self, interrupt_at_step: int | None = None) -> bool:
        """Train the rest of the current epoch; ``False`` when ``max_steps`` ended it early."""
        tc, d, progress = self.config.train, self.config.data, self.progress
        windows = bptt_batches(
            self.train_data, d.bptt, d.variable_bptt, self.bptt_gen, progress.position
        )
        for start, x, y in windows:
            self.step(start, x, y)
            evaluated = bool(tc.eval_every) and progress.step % tc.eval_every == 0
            if evaluated:
                self.evaluate()
            if evaluated or progress.step % tc.checkpoint_every == 0:
                self.checkpoint()  # at each evaluation too, so its metrics line is never lost
            if interrupt_at_step is not None and progress.step >= interrupt_at_step:
                raise KeyboardInterrupt(f"interrupted after step {progress.step}")
            if self.max_steps and progress.step >= self.max_steps:
                return False
        if progress.evaluated_step != progress.step:  # every epoch ends with an evaluation
            self.evaluate()
        progress.epoch += 1
        progress.position = 0
        self.state = None
        self.checkpoint()
        return True

    def run(self, interrupt_at_step: int | None = None) -> dict[str, Any]:
        """Train to the end (epochs, ``max_steps`` or early stopping); returns the summary.

        Args:
            interrupt_at_step: Raise ``KeyboardInterrupt`` after this step (tests of resumption).
        """
        progress, tc = self.progress, self.config.train
        while (
            progress.epoch <= tc.epochs
            and not (self.max_steps and progress.step >= self.max_steps)
            and not self.patience_spent()
        ):
            if not self.run_epoch(interrupt_at_step):
                break
        if progress.evaluated_step != progress.step:
            self.evaluate()
        if self.patience_spent():
            _log(
                self.rank,
                f"epoch {progress.epoch - 1}: no better validation for {tc.patience} epochs",
            )
        self.checkpoint()
        self.bar.close()
        if self.world > 1:  # every rank tests the same best.pt: wait until rank 0 has written it
            dist.barrier()
        summary = _summary(
            self.config, self.model, self.out, self.test_data, progress, self.dry_run, self.device
        )
        if self.rank == 0:
            save_json(summary, self.out / "summary.json")
        return summary


RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl", "summary.json", "config.toml")


def train(
    config: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    corpus: Corpus | None = None,
    interrupt_at_step: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and checkpoint one run with a :class:`Trainer`; returns the summary.

    Args:
        config: The experiment.
        out_dir: Run directory.
        resume: Continue from ``out_dir/checkpoint.pt`` (an error when there is none).
        overwrite: Delete the run already in ``out_dir`` and start again.
        dry_run: Stop after 3 steps with a shortened evaluation.
        corpus: A preloaded corpus (default: loaded from the config).
        interrupt_at_step: Raise ``KeyboardInterrupt`` after this step (tests of resumption).
        show_progress: Show a progress bar (on a terminal).

    Returns:
        The contents of ``summary.json``.
    """
    trainer = Trainer(
        config,
        out_dir,
        resume=resume,
        dry_run=dry_run,
        corpus=corpus,
        show_progress=show_progress,
        overwrite=overwrite,
    )
    return trainer.run(interrupt_at_step)


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
        "train_cpu_seconds": progress.train_cpu_seconds,
        "threads": torch.get_num_threads(),
        "device": torch.device(device).type,
        "machine": machine_description(device),
        "seconds_per_step": progress.train_seconds / max(progress.step, 1),
        "tokens_per_second": progress.train_tokens / max(progress.train_seconds, 1e-9),
    }


def machine_description(device: torch.device | str) -> str:
    """The processor (or GPU) and core count, recorded beside a run's timings."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        models = [line for line in lines if line.startswith("model name")]
        name = models[0].split(":", 1)[1].strip() if models else name
    return f"{name}, {os.cpu_count()} logical cores"


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


def _progress_bar(total: int, initial: int, disable: bool, unit: str = "step"):
    """A tqdm bar on a terminal; nothing otherwise (or without tqdm)."""
    if disable or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)
