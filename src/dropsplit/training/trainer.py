"""Train any task (the AWD-style LMs, a ``transformers`` causal LM, a classifier) with any method.

What is trained comes from the task ``model.name`` names (:mod:`~dropsplit.training.tasks`): its
model, batches, forward function, carried state and evaluation; the loop, the optimizer, NT-ASGD,
checkpoints, exact resume and DDP are the trainer's.

A run directory holds ``config.toml`` (resolved), ``metrics.jsonl`` (one object per evaluation),
``checkpoint.pt`` (everything needed to continue exactly: weights, optimizer, averaged weights,
the method's generator, RNG states, the position in the epoch, the state carried between batches
(a language model's recurrent state) and the task's own state),
``best.pt`` (weights at the best validation loss) and ``summary.json``. Every file is written
atomically (:mod:`~dropsplit.training.checkpoint`), so a killed run resumes from its last
checkpoint as if it had never stopped; SIGTERM ends a run with a last checkpoint. One process
at a time trains in a run directory (a lock), and any run file there counts as a run (replaced
only with ``overwrite``). Under ``torchrun`` each process trains on its own columns of the batch
and DDP averages the gradients in the method's single outer backward.

The divergence guard skips (or, with ``train.divergence="restore"``, undoes) a step whose loss
is not finite or above ``train.divergence_factor`` times its running mean (which moves on every
step), whose explicit term spikes, or whose gradient is not finite (checked before the optimizer
step); ``train.max_skips`` skipped steps in a row stop the run with :class:`DivergedError`.
``summary.json`` counts the skipped steps and records the git commit of the source that trained
the run (and of each resume).

:class:`Trainer` holds one run: its parts come from :mod:`~dropsplit.training.build`, and its
step, evaluation and checkpoint are methods; :func:`train` runs one to the end.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dropsplit.data import Corpus
from dropsplit.training.build import build_method, build_optimizer
from dropsplit.training.checkpoint import (
    LOCK_NAME,
    TEMPORARY_SUFFIX,
    RunLock,
    check_weights,
    damaged,
    load_checked,
    load_weights_into,
    save_json,
    save_text,
    save_torch,
    truncate_metrics,
)
from dropsplit.training.config import Config, check_resumable, to_dict, to_toml
from dropsplit.training.tasks import Evaluation, Step, Task, pack_state, task_class, unpack_state
from dropsplit.training.tasks.base import progress_bar as _progress_bar
from dropsplit.training.tasks.lm import evaluate  # noqa: F401 (re-exported: the LM evaluation)
from dropsplit.training.threads import set_threads

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
    consecutive_skips: int = 0  # skipped steps since the last one taken (max_skips stops the run)
    # the source each stretch of the run was trained with: {"step", "commit", "dirty"} per start
    sources: list[dict[str, Any]] = field(default_factory=list)


class DivergedError(ValueError):
    """The run skipped ``train.max_skips`` steps in a row: it stopped (one line says what to do)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, SLURM, Docker) ended the run after a last checkpoint."""


# The version of the training numerics, recorded in every summary beside the commit: bumped by
# every change that can move a trained number (a method's or an estimator's gradient, a model's
# forward or init, the optimizer, the data windows, the spike guard), and only by those, so runs
# that record the same value compare as one code version even when their commits differ.
NUMERICS = 1


@functools.lru_cache(maxsize=1)
def source_commit() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout this dropsplit runs from; ``None`` if none.

    The checkout must be the one holding this very source (``src/dropsplit`` under its top
    level), not a repository that happens to hold an installed copy (a virtual environment
    inside a clone). ``dirty``: tracked files differ from the commit.
    """
    top = Path(__file__).resolve().parents[3]  # src/dropsplit/training/trainer.py -> top
    if not (top / ".git").exists():
        return None

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(top), *args], capture_output=True, text=True, timeout=20, check=True
        )
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != top:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def distributed() -> tuple[int, int]:
    """``(rank, world_size)``, initialising the process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def diverged(loss: float, progress: Progress, factor: float) -> bool:
    """Non-finite, or above ``factor`` times the running mean of recent losses.

    The mean moves on every step with a finite loss, skipped ones too, so a lasting rise (or one
    bad update) cannot lock out every later step.
    """
    if not math.isfinite(loss):
        return True
    return progress.step >= 10 and loss > factor * progress.loss_ema


def gradient_finite(params: list[nn.Parameter]) -> bool:
    """Whether every gradient written is finite (a NaN gradient can come with a finite loss)."""
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def non_finite_entry(state: dict[str, torch.Tensor]) -> str | None:
    """The first floating-point entry of a state dict with a NaN or an infinity, else ``None``."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
            return name
    return None


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
        corpus: A preloaded corpus (default: loaded from the config) for a task trained on one.
        show_progress: Show a progress bar (on a terminal).

    The trainer holds ``out_dir``'s lock (:class:`~dropsplit.training.checkpoint.RunLock`) from
    its creation to the end of :meth:`run` (or :meth:`close`): a second trainer on the same
    directory is refused. It sets the process's intra-op thread count for its model
    (``train.threads``, else :func:`~dropsplit.training.threads.set_threads`'s rule).

    Raises:
        FileExistsError: If ``out_dir`` holds a run (any of its files) and neither ``resume`` nor
            ``overwrite`` is set, holds files that are not a run's, or another process trains
            in it (:class:`~dropsplit.training.checkpoint.RunInUseError`, naming its PID).
        FileNotFoundError: If ``resume`` is set and ``out_dir`` holds no checkpoint.
        ValueError: For an ``out_dir`` that cannot be a run directory, a CUDA device that is not
            there, a resume with a changed config, a damaged checkpoint or ``best.pt``, or (under
            ``torchrun``) a checkpoint of another process count or a rank file of another step.
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
        tc = config.train
        if tc.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f'train.device="{tc.device}" but no CUDA device is available: '
                'set train.device="cpu"'
            )
        self.lock = RunLock(self.out)
        if self.rank == 0:
            self._prepare_directory(resume, overwrite)
        try:
            self._build(config, resume, corpus, show_progress)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock (:meth:`run` does at its end)."""
        self.lock.release()

    def _build(
        self, config: Config, resume: bool, corpus: Corpus | None, show_progress: bool
    ) -> None:
        d, tc = config.data, config.train
        self.device = torch.device(tc.device)
        torch.manual_seed(tc.seed)
        self.task: Task = task_class(config.model.name)(
            config, self.device, rank=self.rank, world=self.world, corpus=corpus
        )
        self.model = self._build_model()
        set_threads(tc.threads, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.method = build_method(config.method, tc.seed + 1000 * self.rank, d.batch_size)
        self.optimizer = build_optimizer(config.optim, self.params)
        self.averager = Averager(self.params, config.optim.nonmono)
        self.trained: nn.Module = self.model
        if self.world > 1:
            self.trained = nn.parallel.DistributedDataParallel(self.model)
        self.bptt_gen = torch.Generator().manual_seed(tc.seed + 1)  # the task's batches
        self.max_steps = 3 if self.dry_run else tc.max_steps
        self.progress = Progress()
        self.state: Any = None  # the task's state carried across batches (an LM's recurrent one)
        self.terminate: int | None = None  # the signal that asked the run to stop (SIGTERM)
        self.checkpointed_step: int | None = None  # the step of the last checkpoint written
        if resume:
            self.resume()
            self.checkpointed_step = self.progress.step
        self.progress.sources.append({"step": self.progress.step, **_source()})
        if self.rank == 0:  # on resume, the keys that may change (check_resumable) are recorded
            save_text(to_toml(config), self.out / "config.toml")
        total = tc.epochs * self.task.steps_per_epoch()
        total = min(total, self.max_steps) if self.max_steps else total
        self.bar = _progress_bar(
            total, self.progress.step, disable=self.rank != 0 or not show_progress
        )

    def _build_model(self) -> nn.Module:
        """The task's model on the device; a size too large is one line naming the sizes."""
        try:
            return self.task.build_model().to(self.device)
        except (RuntimeError, MemoryError) as err:  # e.g. model.hidden_size=10**12
            flat = {
                f"{section}.{key}": value
                for section, values in to_dict(self.config).items()
                for key, value in values.items()
            }
            sizes = ", ".join(f"{k}={flat[k]}" for k in self.task.size_keys if k in flat)
            raise ValueError(
                f"the model cannot be built ({sizes}): "
                f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else 'no memory'}"
                "; choose smaller sizes"
            ) from err

    def _prepare_directory(self, resume: bool, overwrite: bool) -> None:
        """Create and lock the run directory, then :meth:`_check_directory` under the lock."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--out {self.out} cannot be a run directory: {err.strerror}") from err
        if not os.access(self.out, os.W_OK):
            raise ValueError(f"--out {self.out} is not writable")
        if not resume:  # before the lock file is made: a foreign directory is left as it was
            self._check_foreign()
        self.lock.acquire()
        try:
            self._check_directory(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _check_foreign(self) -> None:
        """Refuse a directory holding files that are not a run's (``--out .`` in a project)."""
        foreign = sorted(p.name for p in self.out.iterdir() if not is_run_entry(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise FileExistsError(
                f"--out {self.out} holds files that are not a run's ({shown}): give a new or "
                "empty directory (or a run directory) as --out"
            )

    def _check_directory(self, resume: bool, overwrite: bool) -> None:
        """The refusals of :meth:`_prepare_directory`, under the lock; ``overwrite`` deletes."""
        if not resume:
            self._check_foreign()
        # a kill in the middle of a write leaves its temporary; under the lock none is live
        for name in RUN_FILES:
            for stale in self.out.glob(f".{name}.*{TEMPORARY_SUFFIX}"):
                stale.unlink(missing_ok=True)
        if overwrite and not resume:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            for stale in self.out.glob("rank*.pt"):
                stale.unlink()
        found = [name for name in RUN_FILES if (self.out / name).exists()]
        found += sorted(p.name for p in self.out.glob("rank*.pt"))
        if resume and not self.checkpoint_path.exists():
            raise FileNotFoundError(
                f"nothing to resume in {self.out} (no checkpoint.pt): run without --resume"
                + (" (with --overwrite to replace what is there)" if found else "")
            )
        if not resume and found:
            options = "--resume, --overwrite" if self.checkpoint_path.exists() else "--overwrite"
            raise FileExistsError(
                f"{self.out} already holds a run ({', '.join(found)}); pass {options} or another "
                "--out"
            )
        if resume:
            check_resumable(self.out / "config.toml", self.config)

    def load_weights(self) -> dict[str, Any]:
        """Weights, optimizer and averages of the last checkpoint; returns the checkpoint.

        Raises:
            ValueError: If the checkpoint is damaged (one line naming it and the fix).
        """
        path, fix = self.checkpoint_path, RESTART
        keys = ("model", "optimizer", "method", "averager", "bptt_generator", "torch_rng")
        ckpt = load_checked(path, fix, self.device, keys=(*keys, "state", "progress"))
        load_weights_into(self.model, ckpt["model"], path, fix)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.averager.load_state_dict(ckpt["averager"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            raise damaged(path, f"its optimizer state does not fit: {err}", fix) from err
        return ckpt

    def resume(self) -> None:
        """Continue exactly where the last checkpoint left off (metrics after it are dropped).

        Raises:
            ValueError: If the checkpoint is damaged or holds non-finite weights, or ``best.pt``
                is missing or damaged (all before any training).
        """
        ckpt = self.load_weights()
        path, fix = self.checkpoint_path, RESTART
        try:
            self.method.load_state_dict(ckpt["method"])
            self.bptt_gen.set_state(ckpt["bptt_generator"])
            torch.set_rng_state(ckpt["torch_rng"])
            self.state = unpack_state(ckpt["state"])
            self.task.load_state_dict(ckpt.get("task", {}))
            self.progress = Progress(**ckpt["progress"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            raise damaged(path, f"its training state does not fit: {err}", fix) from err
        bad = non_finite_entry(ckpt["model"])
        if bad is not None:
            raise ValueError(
                f"{path} holds non-finite weights ({bad}, step {self.progress.step}): the run had "
                f"diverged before it was saved; it cannot go on: {fix} (e.g. with a lower optim.lr)"
            )
        world = ckpt.get("world", self.world)  # not recorded before rank files had a step
        if world != self.world:
            raise ValueError(
                f"{path} was written by {world} process{'es' if world != 1 else ''}, not "
                f"{self.world}: resume with as many (torchrun --nproc_per_node {world}; one "
                "process: plain dropsplit train), or start again with --overwrite"
            )
        if self.rank != 0:
            own = self._load_rank_file(self.rank)
            self.method.load_state_dict(own["method"])
            self.state = unpack_state(own["state"])
        else:  # every rank file checked here too, so the refusal is rank 0's line, on the screen
            for rank in range(1, self.world):
                self._load_rank_file(rank)
        if self.rank == 0:
            self._check_best()
            truncate_metrics(self.out / "metrics.jsonl", self.progress.step)

    def _load_rank_file(self, rank: int) -> dict[str, Any]:
        """``rank<r>.pt``, written with the checkpoint this run resumes from.

        A rank file holds the method state and recurrent state of one process at the step of
        ``checkpoint.pt``; a file of another step (a kill between the two writes, or a file of
        another run) would resume silently and inexactly.

        Raises:
            FileNotFoundError: If the file is missing.
            ValueError: If it is damaged or of another step (one line naming both files).
        """
        path, fix = self.out / f"rank{rank}.pt", RESTART
        own = load_checked(path, fix, self.device, keys=("method", "state"))
        step = own.get("step")  # None: written before rank files recorded their step
        if step is not None and step != self.progress.step:
            raise ValueError(
                f"{path} is from step {step}, {self.checkpoint_path} from step "
                f"{self.progress.step}: they were not saved together (a kill between the two "
                f"writes, or a file of another run), so the run cannot resume exactly; {fix}"
            )
        return own

    def _check_best(self) -> None:
        """``best.pt`` of a run that has evaluated: present, whole and of this model.

        Checked at resume, not after all the remaining training (the summary's test perplexity
        is of these weights).
        """
        best = self.out / "best.pt"
        if not math.isfinite(self.progress.best_val):
            return  # no evaluation yet (or none finite): nothing saved, nothing to check
        fix = RESTART
        if not best.is_file():
            raise FileNotFoundError(
                f"{best} is missing, though the run has evaluated (best valid loss "
                f"{self.progress.best_val:.4f}): its best weights are lost, so its summary would "
                f"pair that loss with other weights; {fix}"
            )
        check_weights(self.model.state_dict(), load_checked(best, fix, self.device), best, fix)

    def checkpoint(self) -> None:
        """Save everything needed to continue exactly (each rank its masks and state).

        Rank ``r > 0`` writes ``rank<r>.pt`` with the step, rank 0 ``checkpoint.pt`` with the
        step and the number of processes; :meth:`resume` refuses files that do not match.
        """
        if self.rank != 0:
            own = {
                "method": self.method.state_dict(),
                "state": pack_state(self.state),
                "step": self.progress.step,  # tied to checkpoint.pt's step (checked at resume)
            }
            save_torch(own, self.out / f"rank{self.rank}.pt")
            return
        save_torch(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(),
                "averager": self.averager.state_dict(),
                "bptt_generator": self.bptt_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "state": pack_state(self.state),
                "task": self.task.state_dict(),
                "progress": self.progress.__dict__,
                "world": self.world,  # the processes whose rank files go with it
            },
            self.checkpoint_path,
        )
        self.checkpointed_step = self.progress.step

    def evaluate(self) -> float:
        """Validate (on the averaged weights under NT-ASGD), keep the best, log one line."""
        config, progress, averager = self.config, self.progress, self.averager
        averager.swap()
        max_batches = 2 if self.dry_run else config.train.max_eval_batches
        result = self.task.evaluate(self.model, "valid", max_batches)
        val = result.loss
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
            # null when every step since the last evaluation was skipped (not a loss of 0.0)
            "train_loss": progress.loss_sum / count if progress.loss_count else None,
            "val_loss": val,
            "val_ppl": math.exp(min(val, 50.0)),
            **{f"val_{k}": v for k, v in result.metrics.items()},
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
                f.flush()
                os.fsync(f.fileno())  # on the disk before the checkpoint that counts it
        progress.loss_sum, progress.loss_count, progress.stat_sums = 0.0, 0, {}
        return val

    def patience_spent(self) -> bool:
        """Early stopping: no better validation for ``patience`` evaluations."""
        tc, history = self.config.train, self.progress.val_history
        # never before `min_epochs`: a run can sit on its initial plateau for dozens of epochs
        if not tc.patience or not history or self.progress.epoch - 1 < tc.min_epochs:
            return False
        return len(history) - 1 - history.index(min(history)) >= tc.patience

    def _set_learning_rate(self, window: int | None) -> None:
        """``optim.lr``, decayed after its epoch, scaled by the window's length under SGD."""
        config = self.config
        lr = config.optim.lr
        if 0 < config.optim.decay_after < self.progress.epoch:  # WikiText-103 QRNN schedule
            lr *= config.optim.lr_decay
        if window is not None and config.optim.name not in ("adam", "adamw"):
            lr = lr * window / config.data.bptt  # AWD; in this order: the same floats as before
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, item: Step) -> None:
        """One step of the method on a batch of the task (:class:`Step`), guarded."""
        config, progress = self.config, self.progress
        tick, cpu_tick = time.perf_counter(), time.process_time()
        if self.state is None:
            self.state = self.task.initial_state(self.model)
        self._set_learning_rate(item.window)
        self.optimizer.zero_grad(set_to_none=True)  # step() adds to p.grad
        batch = self.task.bind(item.batch, self.state)
        result = self.method.step(self.trained, self.task.forward, batch)
        progress.step += 1
        progress.position = item.position
        factor, explicit = config.train.divergence_factor, result.stats.get("explicit")
        loss_finite = result.finite and math.isfinite(result.loss)
        if not loss_finite or diverged(result.loss, progress, factor):
            skip: str | None = f"loss {result.loss:.4g} diverged"
        elif explicit_spike(explicit, progress, factor):
            skip = f"explicit term {explicit:.4g} > {factor} x its mean {progress.explicit_ema:.4g}"
        else:  # the gradient, before it reaches the weights: NaN can come with a finite loss
            finite = (
                bool(torch.isfinite(nn.utils.clip_grad_norm_(self.params, config.optim.clip)))
                if config.optim.clip > 0
                else gradient_finite(self.params)
            )
            skip = None if finite else f"gradient not finite (loss {result.loss:.4g})"
        if skip is None:
            self.optimizer.step()
            self.averager.update()
            self.state = self.task.carry(result.aux)
            progress.loss_sum += result.loss
            progress.loss_count += 1
            progress.consecutive_skips = 0
            for key in STAT_KEYS:
                if key in result.stats:
                    progress.stat_sums[key] = progress.stat_sums.get(key, 0.0) + result.stats[key]
        if loss_finite:  # on skipped steps too, or one bad update would lock out every later step
            progress.loss_ema = (
                result.loss
                if progress.step == 1 or progress.loss_ema == 0.0
                else 0.9 * progress.loss_ema + 0.1 * result.loss
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
        progress.train_tokens += item.examples * self.world
        self.bar.update(1)
        if progress.step % config.train.log_every == 0:
            self.bar.set_postfix(epoch=progress.epoch, loss=f"{result.loss:.3f}")
        if skip is not None:
            self._skip(skip)

    def _skip(self, reason: str) -> None:
        """The divergence guard: count the step, warn, and skip it or restore the checkpoint.

        Raises:
            DivergedError: After ``train.max_skips`` skipped steps in a row (the last checkpoint,
                from before them, is kept).
        """
        tc, progress = self.config.train, self.progress
        restore = tc.divergence == "restore"
        progress.skipped += 1
        progress.consecutive_skips += 1
        warnings.warn(
            f"step {progress.step}: {reason}; "
            + ("last checkpoint restored" if restore else "step skipped"),
            RuntimeWarning,
            stacklevel=3,
        )
        self.state = None
        if tc.max_skips and progress.consecutive_skips >= tc.max_skips:
            self.bar.close()
            kept = (
                f"its last checkpoint (step {self.checkpointed_step}) is kept"
                if self.checkpointed_step is not None
                else "no checkpoint was written"
            )
            raise DivergedError(
                f"{self.out}: the run diverged: {progress.consecutive_skips} steps in a row "
                f"skipped (train.max_skips) up to step {progress.step}, the last for {reason}; "
                f"{kept}; start again with --overwrite and a lower optim.lr (or "
                'train.divergence="restore")'
            )
        if restore and self.checkpoint_path.exists():
            self.load_weights()

    def run_epoch(self, interrupt_at_step: int | None = None) -> bool:
        """Train the rest of the current epoch; ``False`` when ``max_steps`` ended it early."""
        tc, progress = self.config.train, self.progress
        for item in self.task.batches(self.bptt_gen, progress.position):
            self.step(item)
            evaluated = bool(tc.eval_every) and progress.step % tc.eval_every == 0
            if evaluated:
                self.evaluate()
            if evaluated or progress.step % tc.checkpoint_every == 0:
                self.checkpoint()  # at each evaluation too, so its metrics line is never lost
            if self.terminate is not None:
                self._stop_on_signal()
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

    def _stop_on_signal(self) -> None:
        """End the run at a step's end: a last checkpoint, then :class:`Terminated`."""
        if self.checkpointed_step != self.progress.step:
            self.checkpoint()
        self.bar.close()
        raise Terminated(
            f"{self.out}: stopped by signal {self.terminate} after step {self.progress.step} "
            "(checkpoint written)"
        )

    def run(self, interrupt_at_step: int | None = None) -> dict[str, Any]:
        """Train to the end (epochs, ``max_steps`` or early stopping); returns the summary.

        SIGTERM (``kill``, SLURM, Docker) ends the run at the end of the step under way with a
        last checkpoint and :class:`Terminated` (a ``KeyboardInterrupt``): ``--resume`` goes
        on from there. The run directory's lock is released at the end, whatever happens.

        Args:
            interrupt_at_step: Raise ``KeyboardInterrupt`` after this step (tests of resumption).
        """
        previous = None
        if threading.current_thread() is threading.main_thread():

            def on_term(signum: int, frame: Any) -> None:
                self.terminate = signum

            previous = signal.signal(signal.SIGTERM, on_term)
        try:
            return self._run(interrupt_at_step)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.close()

    def _run(self, interrupt_at_step: int | None) -> dict[str, Any]:
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
            self.config, self.model, self.out, self.task, progress, self.dry_run, self.device
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


RESTART = (
    "start the run again with --overwrite (or give another --out), or put back a good copy "
    "of the file"
)
# what a run directory may hold besides the run's files: its measurements, a suite's run.json,
# the lock, and logs (`dropsplit train ... > RUN/train.log` makes the log before the run starts)
RUN_ENTRIES = (
    *RUN_FILES,
    "rank*.pt",
    "run.json",
    "measure",
    "noise_scale.json",
    LOCK_NAME,
    "*.log",
)


def is_run_entry(name: str) -> bool:
    """Whether a file of this name belongs in a run directory (a run's, or its temporaries)."""
    if name.startswith(".") and name.endswith(TEMPORARY_SUFFIX):  # an atomic write's temporary
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_ENTRIES)


def _source() -> dict[str, Any]:
    """:func:`source_commit` (``None`` values outside a checkout) and :data:`NUMERICS`."""
    return dict(source_commit() or {"commit": None, "dirty": None}) | {"numerics": NUMERICS}


def _provenance(progress: Progress) -> dict[str, Any]:
    """The summary's record of the source: the commit that started the run, and each resume's."""
    first = progress.sources[0] if progress.sources else {"step": -1, "commit": None}
    started = first["step"] == 0 and (first["commit"] is not None or "numerics" in first)
    keys = ("commit", "dirty", "numerics")
    return {
        "git": {k: first[k] for k in keys if k in first} if started else None,
        "resumed": [dict(s) for s in progress.sources if s["step"] > 0],
    }


def _summary(config, model, out, task, progress, dry_run, device) -> dict[str, Any]:
    best = out / "best.pt"
    if best.exists():
        state = load_checked(best, RESTART, device)
        load_weights_into(model, state, best, RESTART)
    result: Evaluation = task.evaluate(model, "test", 2 if dry_run else 0)
    test, best_val = result.loss, progress.best_val
    return {
        "config": to_dict(config),
        "best_val_loss": best_val,
        "best_val_ppl": math.exp(min(best_val, 50.0)),
        "test_loss": test,
        "test_ppl": math.exp(min(test, 50.0)),
        **{f"test_{k}": v for k, v in result.metrics.items()},
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
        **_provenance(progress),
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
