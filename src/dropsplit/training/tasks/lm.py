"""The language models of the paper (``lstm``, ``qrnn``, ``transformer``) as one task.

A corpus cut into ``data.batch_size`` columns (each ``torchrun`` process its own), truncated-BPTT
windows of AWD's random length drawn from the trainer's generator, the recurrent state carried
from window to window (detached), and a token-mean evaluation over windows of ``data.bptt``.
The model keys are the flat keys of ``[model]`` (:class:`~dropsplit.training.config.ModelConfig`),
as in every config written before tasks existed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from dropsplit.data import batchify, bptt_batches, load_corpus
from dropsplit.models import LanguageModel
from dropsplit.models.awd import detach_state, lm_forward
from dropsplit.training.build import build_model
from dropsplit.training.tasks.base import Evaluation, Step, Task, progress_bar

if TYPE_CHECKING:
    from dropsplit.data import Corpus
    from dropsplit.training.config import Config


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
    bar = progress_bar(min(windows, max_batches or windows), 0, not show_progress, "window")
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


class LanguageModelTask(Task):
    """``lstm``, ``qrnn`` and ``transformer``: the AWD-style language models on a corpus.

    Attributes:
        corpus: The corpus (its vocabulary sizes the model).
        train_data: This process's columns of the training text, ``[T, B]``.
        valid_data: The validation text in ``data.eval_batch_size`` columns.
        test_data: The test text in ``data.test_batch_size`` columns.
    """

    model_fields = True
    size_keys: ClassVar[tuple[str, ...]] = (
        "model.embedding_size",
        "model.hidden_size",
        "model.layers",
    )

    def __init__(
        self,
        config: Config,
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        world: int = 1,
        corpus: Corpus | None = None,
    ) -> None:
        super().__init__(config, device, rank=rank, world=world, corpus=corpus)
        d = config.data
        self.corpus = corpus or load_corpus(d.corpus, d.path or None, d.train_fraction, d.download)
        columns = batchify(self.corpus.train, d.batch_size * world)
        rank_columns = slice(rank * d.batch_size, (rank + 1) * d.batch_size)
        self.train_data = columns[:, rank_columns].to(self.device)
        self.valid_data = batchify(self.corpus.valid, d.eval_batch_size).to(self.device)
        self.test_data = batchify(self.corpus.test, d.test_batch_size).to(self.device)

    @classmethod
    def check(cls, config: Config) -> None:
        """The Transformer's heads divide its width, and its context holds a window."""
        super().check(config)
        m = config.model
        if m.name != "transformer":
            return
        if m.embedding_size % m.heads:
            raise ValueError(
                f"model.heads ({m.heads}) must divide model.embedding_size ({m.embedding_size})"
            )
        if m.context < config.data.bptt:
            raise ValueError(
                f"model.context ({m.context}) must be at least data.bptt ({config.data.bptt}) "
                "(variable windows that run longer are cut to the context)"
            )

    def build_model(self) -> nn.Module:
        """The model ``model.name`` picks (:func:`~dropsplit.training.build.build_model`)."""
        return build_model(self.config, len(self.corpus.vocab))

    def steps_per_epoch(self) -> int:
        """Windows of ``data.bptt`` in this process's training text."""
        return max(1, (self.train_data.shape[0] - 1) // self.config.data.bptt)

    def batches(self, generator: torch.Generator, position: int) -> Iterator[Step]:
        """Truncated-BPTT windows ``(inputs, targets)`` from row ``position`` on."""
        d, m = self.config.data, self.config.model
        # a Transformer sees at most its context: a longer random window is cut to it (the draws
        # are unchanged, so runs whose windows fit are bit for bit the same)
        context = m.context if m.name == "transformer" else None
        for start, x, y in bptt_batches(
            self.train_data, d.bptt, d.variable_bptt, generator, position, max_length=context
        ):
            yield Step(start + x.shape[0], (x, y), x.numel(), x.shape[0])

    def forward(self, model: nn.Module, batch: Any) -> tuple:
        """:func:`~dropsplit.models.awd.lm_forward` on ``(inputs, targets, state)``."""
        return lm_forward(model, batch)

    def initial_state(self, model: nn.Module) -> Any:
        """The model's zero state for ``data.batch_size`` columns."""
        return cast(LanguageModel, model).init_state(self.config.data.batch_size)

    def bind(self, batch: Any, state: Any) -> Any:
        """``(inputs, targets, state)``."""
        inputs, targets = batch
        return inputs, targets, state

    def carry(self, aux: Any) -> Any:
        """The window's last state, detached (truncated BPTT)."""
        return detach_state(aux)

    def evaluate(
        self, model: nn.Module, split: str, max_batches: int = 0, show_progress: bool = False
    ) -> Evaluation:
        """Token-mean loss over windows of ``data.bptt`` (:func:`evaluate`)."""
        data = {"valid": self.valid_data, "test": self.test_data}[split]
        lm = cast(LanguageModel, model)
        return Evaluation(evaluate(lm, data, self.config.data.bptt, max_batches, show_progress))
