"""``digits-mlp``: an MLP classifier on scikit-learn's bundled digits (8x8 images, 10 classes).

The data set ships inside scikit-learn (``sklearn.datasets.load_digits``: 1,797 images, no
download); scikit-learn is an optional extra (``pip install 'dropsplit[tasks]'``), imported when
the task is built. The split is fixed (a permutation drawn from its own seed, the same for every
``train.seed``): 1,077 training images, 360 validation, 360 test; features are scaled to
``[0, 1]``. An epoch visits the training images in a fresh order drawn from the trainer's batch
generator, in full batches of ``data.batch_size`` rows (the last, partial one is dropped), and
the order is checkpointed with the task, so a resume mid-epoch is exact. The loss is the
example-mean cross-entropy; evaluation logs it and the accuracy.

Its keys are the table ``[model.mlp]`` (:class:`DigitsMLPConfig`); of ``[data]`` it reads only
the batch sizes and ``train_fraction`` (``corpus``, ``bptt`` and ``variable_bptt`` are refused).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dropsplit.models.mlp import ACTIVATIONS, MLPClassifier
from dropsplit.optional import require
from dropsplit.training.tasks.base import Evaluation, Step, Task

if TYPE_CHECKING:
    from dropsplit.data import Corpus
    from dropsplit.training.config import Config

SPLIT_SEED = 0  # the permutation that splits the images (fixed: every run sees the same split)
VALID_SIZE = TEST_SIZE = 360


@dataclass(frozen=True)
class DigitsMLPConfig:
    """``[model.mlp]``: the MLP of ``digits-mlp``."""

    hidden_sizes: tuple[int, ...] = (64,)
    activation: str = field(default="relu", metadata={"check": tuple(ACTIVATIONS)})
    p_input: float = field(default=0.0, metadata={"check": "probability"})
    p_hidden: float = field(default=0.5, metadata={"check": "probability"})

    def check(self, config: Config) -> None:
        """A training batch fits in the training images.

        Raises:
            ValueError: Naming ``data.batch_size``.
        """
        rows = training_rows(config.data.train_fraction)
        if config.data.batch_size > rows:
            raise ValueError(
                f"config key data.batch_size ({config.data.batch_size}) must be at most the "
                f"{rows} training images of digits-mlp"
            )


def training_rows(train_fraction: float) -> int:
    """The training images kept with ``data.train_fraction`` (at least one)."""
    return max(1, round(train_fraction * (1797 - VALID_SIZE - TEST_SIZE)))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[1797, 64]`` in ``[0, 1]`` and labels ``[1797]`` of scikit-learn's digits.

    The features have torch's default dtype, as the model's weights.

    Raises:
        ModuleNotFoundError: One line naming the extra, without scikit-learn.
    """
    datasets = require(
        "sklearn.datasets", "the digits-mlp task", "dropsplit[tasks]", package="scikit-learn"
    )
    bunch = datasets.load_digits()
    features = torch.tensor(bunch.data, dtype=torch.get_default_dtype()) / 16.0  # the model's
    return features, torch.tensor(bunch.target, dtype=torch.long)


class DigitsMLPTask(Task):
    """An MLP (:class:`~dropsplit.models.MLPClassifier`) on the digits; examples are rows."""

    section = "mlp"
    options = DigitsMLPConfig
    data_keys = (
        "path",
        "download",
        "train_fraction",
        "batch_size",
        "eval_batch_size",
        "test_batch_size",
    )
    size_keys = ("model.mlp",)

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
        features, labels = load_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        test, valid = order[:TEST_SIZE], order[TEST_SIZE : TEST_SIZE + VALID_SIZE]
        train = order[TEST_SIZE + VALID_SIZE :][: training_rows(config.data.train_fraction)]
        self.splits = {
            name: (features[rows].to(self.device), labels[rows].to(self.device))
            for name, rows in (("train", train), ("valid", valid), ("test", test))
        }
        self.order = torch.arange(len(train))  # this epoch's order of the training rows

    @property
    def opts(self) -> DigitsMLPConfig:
        """The ``[model.mlp]`` keys (their defaults where the config has none)."""
        options = self.config.model.options
        return options if isinstance(options, DigitsMLPConfig) else DigitsMLPConfig()

    def build_model(self) -> nn.Module:
        """The MLP of ``[model.mlp]`` (64 inputs, 10 classes)."""
        o = self.opts
        return MLPClassifier(64, 10, o.hidden_sizes, o.activation, o.p_input, o.p_hidden)

    def steps_per_epoch(self) -> int:
        """Full batches of ``data.batch_size`` rows (each process its share of each)."""
        return max(1, len(self.order) // (self.config.data.batch_size * self.world))

    def batches(self, generator: torch.Generator, position: int) -> Iterator[Step]:
        """Batches of rows from row ``position`` of the epoch's order (drawn at position 0)."""
        if position == 0:
            self.order = torch.randperm(len(self.order), generator=generator)
        size = self.config.data.batch_size
        features, labels = self.splits["train"]
        whole = size * self.world
        for start in range(position, len(self.order) - whole + 1, whole):
            rows = self.order[start + self.rank * size : start + (self.rank + 1) * size]
            rows = rows.to(self.device)
            yield Step(start + whole, (features[rows], labels[rows]), size)

    def forward(self, model: nn.Module, batch: Any) -> tuple:
        """``(logits[B, 10], labels[B])``."""
        features, labels = batch
        return model(features), labels

    def evaluate(
        self, model: nn.Module, split: str, max_batches: int = 0, show_progress: bool = False
    ) -> Evaluation:
        """Example-mean cross-entropy and accuracy over ``split``, sites off."""
        features, labels = self.splits[split]
        d = self.config.data
        size = d.eval_batch_size if split == "valid" else d.test_batch_size
        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for n, start in enumerate(range(0, len(labels), size)):
                if max_batches and n >= max_batches:
                    break
                logits = model(features[start : start + size])
                y = labels[start : start + size]
                total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                count += len(y)
        model.train(was_training)
        return Evaluation(total / count, {"accuracy": correct / count})

    def state_dict(self) -> dict[str, Any]:
        """The epoch's order of the training rows."""
        return {"order": self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "order" in state:
            self.order = state["order"].cpu().clone()
