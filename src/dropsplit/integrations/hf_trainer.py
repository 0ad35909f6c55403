"""The Hugging Face ``Trainer`` with a dropsplit method in its training step.

:class:`DropsplitTrainer` is a ``transformers.Trainer`` whose ``training_step`` runs
``method.step(model, forward_fn, inputs, backward=...)`` where the ``Trainer`` would compute
the model's loss and call ``accelerator.backward`` on it. Everything else is the ``Trainer``'s:
optimizer, schedule, clipping, mixed precision (``bf16=True`` / ``fp16=True``: the step runs in
``accelerator.autocast()``, and ``accelerator.backward`` scales the ``fp16`` scalar with its
``GradScaler``), gradient accumulation, DDP's ``no_sync``, logging, evaluation (the model's own
loss, sites off) and checkpoints::

    import dropsplit as ds
    from dropsplit.integrations.hf_trainer import DropsplitTrainer

    model = ds.convert(GPT2LMHeadModel(config))
    trainer = DropsplitTrainer(
        model=model, args=TrainingArguments(..., gradient_accumulation_steps=4),
        train_dataset=dataset, method=ds.DropoutK(2, noise="analytic", seed=0),
    )
    trainer.train()

This module imports ``transformers`` (and through it ``accelerate``): install
``dropsplit[integrations]``. ``import dropsplit`` does not import it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from dropsplit.core.forward import ForwardFn
from dropsplit.integrations.hf_forward import (
    TARGET_COUNTERS,
    causal_lm_forward,
    classification_forward,
    count_causal_lm_targets,
    count_classification_targets,
)
from dropsplit.methods import Method, StepResult

__all__ = [
    "DropsplitTrainer",
    "causal_lm_forward",
    "classification_forward",
    "count_causal_lm_targets",
    "count_classification_targets",
]

_AUTO = "auto"
STATE_FILE = "dropsplit_method{suffix}.pt"  # the method's generator state, in each checkpoint


class DropsplitTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a dropsplit method.

    ``training_step`` mirrors ``Trainer.training_step`` (transformers 5.25): ``model.train()``,
    ``_prepare_inputs``, ``compute_loss_context_manager``, the micro-batch's share of the
    accumulated gradient, ``accelerator.backward`` (the method calls it on the one scalar it
    backpropagates), and the scaled loss returned detached for logging. Under mixed precision
    the whole step runs in autocast, not only the model's forward (see
    :meth:`method_autocast`).

    **Gradient accumulation.** The method's objective is a mean over the targets of one
    micro-batch. When ``count_targets`` can count them without a forward pass (the default for
    :func:`causal_lm_forward` and :func:`classification_forward`), each micro-batch is weighted
    by its share of the targets of the accumulation window (summed over processes under DDP
    with ``average_tokens_across_devices``), so the accumulated gradient is that of the mean
    over every target of the window, as the ``Trainer`` weights its own token-mean loss.
    Otherwise each micro-batch gets ``1 / gradient_accumulation_steps`` (the ``Trainer``'s
    rule for a per-batch mean loss).

    **Logging.** Besides ``loss`` (the method's data loss: the dropout loss for
    ``DropoutK``, the clean loss for ``Analytic``), each logging step adds the mean over its
    micro-batches of the method's scalar stats as ``dropsplit/<name>`` (``objective``,
    ``explicit``, ``implicit``, ``noise``, ``penalty``; per-site stats are left out).

    **Checkpoints** also hold the method's generator state (``dropsplit_method.pt``), so a
    resumed run draws the masks it would have drawn. Under DDP, give each process its own seed
    (e.g. ``seed=base + args.process_index``) or every process draws the same masks.

    Args:
        *args: Passed to ``transformers.Trainer``.
        method: The dropsplit method (``ds.DropoutK(...)``, ``ds.Analytic(...)``, ...).
        forward_fn: ``(model, inputs) -> (logits[N, C], targets[N][, aux])`` on the
            ``Trainer``'s dict batches; :func:`causal_lm_forward` (the default) or
            :func:`classification_forward` for ``transformers`` models.
        count_targets: ``inputs -> N``, the number of targets ``forward_fn`` returns for a
            batch, used to weight micro-batches; ``"auto"`` looks up the counter of the two
            forward functions above; ``None`` weights micro-batches equally.
        **kwargs: Passed to ``transformers.Trainer``.

    Raises:
        TypeError: If ``method`` is not a dropsplit method or ``forward_fn`` is not callable.
        ValueError: For ``Trainer`` options the method replaces or cannot follow:
            ``compute_loss_func``, ``label_smoothing_factor > 0``, several GPUs in one process
            (``DataParallel``: launch one process per GPU with ``torchrun`` instead).
    """

    def __init__(
        self,
        *args: Any,
        method: Method,
        forward_fn: ForwardFn = causal_lm_forward,
        count_targets: Callable[[Mapping[str, Any]], int] | str | None = _AUTO,
        **kwargs: Any,
    ) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method must be a dropsplit method, got {type(method).__name__}")
        if not callable(forward_fn):
            raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}")
        if count_targets == _AUTO:
            count_targets = TARGET_COUNTERS.get(forward_fn)
        elif count_targets is not None and not callable(count_targets):
            raise TypeError(f"count_targets must be callable, 'auto' or None: {count_targets!r}")
        super().__init__(*args, **kwargs)
        # the method computes the loss: an option that changes the Trainer's loss would be
        # silently ignored
        if self.compute_loss_func is not None:
            raise ValueError("compute_loss_func: the dropsplit method computes the loss")
        if self.args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor must be 0: the method's loss is unsmoothed")
        if self.args.n_gpu > 1:  # DataParallel replicas would not see the method's site context
            raise ValueError(
                f"{self.args.n_gpu} GPUs in one process (DataParallel) are not supported: run "
                "one process per GPU (torchrun) or set CUDA_VISIBLE_DEVICES to one device"
            )
        self.method = method
        self.forward_fn = forward_fn
        self.count_targets: Callable[[Mapping[str, Any]], int] | None = count_targets
        self._window_targets: float | None = None  # targets of the accumulation window
        self._stat_sums: dict[str, float] = {}
        self._stat_count = 0

    # --- the training step ---------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, Any]:
        """The ``Trainer``'s micro-batches of one optimizer step; also counts their targets.

        The ``Trainer``'s own count (``num_items_in_batch``) follows its loss and is left to
        it; the micro-batch weights use the targets ``forward_fn`` keeps.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(
            epoch_iterator, num_batches, device
        )
        self._window_targets = None
        if self.count_targets is not None and batch_samples:
            total = torch.tensor(
                float(sum(self.count_targets(batch) for batch in batch_samples)), device=device
            )
            if self._across_devices():
                total = self.accelerator.gather(total).sum()
            self._window_targets = float(total)
        return batch_samples, num_items_in_batch

    def _across_devices(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.args.world_size > 1

    def micro_batch_weight(self, inputs: Mapping[str, Any]) -> float:
        """The factor of this micro-batch's gradient in the accumulated gradient.

        ``N_micro / N_window`` (times the number of processes, which DDP's mean divides out)
        when the window's targets were counted; else ``1 / gradient_accumulation_steps``.
        """
        if self.count_targets is not None and self._window_targets:
            weight = self.count_targets(inputs) / self._window_targets
            if self._across_devices():
                weight *= self.accelerator.num_processes
            return weight
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        return 1.0 / (steps or self.args.gradient_accumulation_steps)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Add the method's gradient on one micro-batch to ``p.grad``.

        Args:
            model: The (possibly wrapped) model the ``Trainer`` trains.
            inputs: One micro-batch from the data collator.
            num_items_in_batch: The ``Trainer``'s count for its own loss (unused: see
                :meth:`micro_batch_weight`).

        Returns:
            The micro-batch's data loss times its weight, detached (the ``Trainer`` sums these
            over the window and logs their mean per optimizer step).
        """
        from accelerate.utils import DistributedType
        from transformers.training_args import OptimizerNames

        prepare = getattr(self, "_prepare_context_parallel_inputs", None)  # transformers >= 5
        if prepare is not None:
            cp_context, inputs = prepare(model, inputs)
        else:
            cp_context = contextlib.nullcontext
        with cp_context():
            model.train()
            train = getattr(self.optimizer, "train", None)
            if callable(train):
                train()  # schedule-free optimizers switch their weights
            inputs = self._prepare_inputs(inputs)
            weight = self.micro_batch_weight(inputs)
            kwargs: dict[str, Any] = {}
            if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
                kwargs["learning_rate"] = self._get_learning_rate()  # they step in backward
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                kwargs["scale_wrt_gas"] = False  # as the Trainer: the weight above scales

            def backward(scalar: torch.Tensor) -> None:
                self.accelerator.backward(scalar * weight, **kwargs)

            with self.compute_loss_context_manager(), self.method_autocast(model):
                result = self.method.step(model, self.forward_fn, inputs, backward=backward)
            del inputs
            self._empty_cache()
            self._record(result)
            return torch.tensor(result.loss * weight, device=self.args.device)

    @contextlib.contextmanager
    def method_autocast(self, model: nn.Module) -> Iterator[None]:
        """Mixed precision around the whole method step instead of inside the model's forward.

        Under ``bf16`` / ``fp16``, ``accelerate`` wraps the model's ``forward`` in autocast and
        casts its outputs to float32. A method then cannot see the autocast region, and the
        estimators that take differences (``"hvp-difference"``, ``"finite-difference"``), which
        leave autocast to take them in float32, would take them in half precision, silently
        (measured on a tiny GPT-2 in bf16: gradient 150 % off). So, for the step, the model's
        own ``forward`` is put back and the step runs in ``accelerator.autocast()``, as a plain
        loop runs ``method.step`` in ``torch.autocast``; the wrapper is restored afterwards.
        """
        inner = self.accelerator.unwrap_model(model)
        original = inner.__dict__.get("_original_forward")
        if original is None or "forward" not in inner.__dict__:  # no mixed precision
            yield
            return
        wrapped = inner.__dict__["forward"]
        inner.forward = original
        try:
            with self.accelerator.autocast():
                yield
        finally:
            inner.forward = wrapped

    def _empty_cache(self) -> None:
        every = self.args.torch_empty_cache_steps
        if every is not None and self.state.global_step % every == 0:
            from accelerate.utils.memory import clear_device_cache

            clear_device_cache()

    # --- logging and checkpoints ---------------------------------------------------------

    def _record(self, result: StepResult) -> None:
        for key, value in result.stats.items():
            if "/" not in key and key not in ("loss", "nonfinite"):  # loss: logged already
                self._stat_sums[key] = self._stat_sums.get(key, 0.0) + value
        self._stat_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The ``Trainer``'s log, with the method's mean stats added to the training logs."""
        if "loss" in logs and self._stat_count:
            for key, total in self._stat_sums.items():
                logs[f"dropsplit/{key}"] = total / self._stat_count
            self._stat_sums, self._stat_count = {}, 0
        super().log(logs, *args, **kwargs)

    def _method_state_file(self, directory: str) -> str:
        suffix = f"_{self.args.process_index}" if self.args.world_size > 1 else ""
        return os.path.join(directory, STATE_FILE.format(suffix=suffix))

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        torch.save(self.method.state_dict(), self._method_state_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and os.path.isfile(self._method_state_file(checkpoint)):
            state = torch.load(self._method_state_file(checkpoint), weights_only=True)
            self.method.load_state_dict(state)
