"""The task protocol: what the trainer asks of a model family, and the checkpointed carried state.

A :class:`Task` is built once per run from the config (its data loaded, on the run's device);
the trainer then only calls it: :meth:`Task.build_model`, :meth:`Task.batches` for an epoch,
:meth:`Task.forward` (the ``forward_fn`` handed to ``method.step``), :meth:`Task.initial_state` /
:meth:`Task.bind` / :meth:`Task.carry` for the state carried between batches (the recurrent
state of a language model; ``None`` for the others) and :meth:`Task.evaluate`.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from dropsplit.training.checkpoint import unflatten_state

if TYPE_CHECKING:
    from dropsplit.data import Corpus
    from dropsplit.training.config import Config


@dataclass
class Step:
    """One training batch of an epoch, as :meth:`Task.batches` yields it.

    Attributes:
        position: Where the epoch stands after this batch (checkpointed: a resumed run asks
            :meth:`Task.batches` to start there).
        batch: What :meth:`Task.bind` hands to :meth:`Task.forward` with the carried state.
        examples: Examples in the batch on this process (tokens for a language model, rows for
            a classifier), for the throughput.
        window: The length of a truncated-BPTT window (SGD scales the learning rate by
            ``window / data.bptt``, as AWD-LSTM does); ``None`` for batches of examples.
    """

    position: int
    batch: Any
    examples: int
    window: int | None = None


@dataclass
class Evaluation:
    """The loss of a split (token-mean or example-mean) and any other metric (``accuracy``)."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """A model family the trainer trains: its model, data, batches, forward and evaluation.

    Class attributes say which config keys the family reads: ``model_fields`` (the flat keys
    of :class:`~dropsplit.training.config.ModelConfig`, the language models'), ``section`` and
    ``options`` (a table ``[model.<section>]`` of its own keys, parsed into the frozen dataclass
    ``options``, whose ``check(config)`` checks them together), ``data_keys`` (the ``[data]``
    keys it reads; ``None``: all) and ``size_keys`` (named when the model cannot be built).

    Args:
        config: The run's config.
        device: Where the data live.
        rank: This process's rank under ``torchrun`` (its share of each batch).
        world: The number of processes.
        corpus: A preloaded corpus (tasks that train on a text corpus).
    """

    model_fields: ClassVar[bool] = False
    section: ClassVar[str | None] = None
    options: ClassVar[type | None] = None
    data_keys: ClassVar[tuple[str, ...] | None] = None
    size_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        config: Config,
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        world: int = 1,
        corpus: Corpus | None = None,
    ) -> None:
        self.config, self.device, self.rank, self.world = config, torch.device(device), rank, world

    @classmethod
    def check(cls, config: Config) -> None:
        """Checks across keys of the family, each error naming the key (default: the options')."""
        options = config.model.options
        if options is not None and hasattr(options, "check"):
            options.check(config)

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model (on the CPU; it draws its initial weights from torch's global generator)."""

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """The number of training batches in an epoch (for the progress bar)."""

    @abstractmethod
    def batches(self, generator: torch.Generator, position: int) -> Iterator[Step]:
        """The training batches of the rest of the epoch from ``position`` (0: a new epoch).

        Args:
            generator: The trainer's batch generator (checkpointed: a resume is exact).
            position: Where the epoch stands (a :attr:`Step.position`; 0 at its start).
        """

    @abstractmethod
    def forward(self, model: nn.Module, batch: Any) -> tuple:
        """``forward_fn`` of the methods: ``(logits[N, C], targets[N][, aux])``."""

    def initial_state(self, model: nn.Module) -> Any:
        """The state carried into the first batch of an epoch (and after a skipped step)."""
        return None

    def bind(self, batch: Any, state: Any) -> Any:
        """What ``method.step`` hands to :meth:`forward`: the batch with the carried state."""
        return batch

    def carry(self, aux: Any) -> Any:
        """The state carried to the next batch from a taken step's ``aux``."""
        return None

    @abstractmethod
    def evaluate(
        self, model: nn.Module, split: str, max_batches: int = 0, show_progress: bool = False
    ) -> Evaluation:
        """The mean loss over ``split`` (``"valid"`` or ``"test"``), sites off.

        Args:
            model: The model (put in eval mode for the evaluation, then back).
            split: ``"valid"`` or ``"test"``.
            max_batches: Evaluate only this many batches (0: all).
            show_progress: A progress bar on a terminal.
        """

    def state_dict(self) -> dict[str, Any]:
        """What the task itself carries across batches (tensors and primitives)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (nothing by default)
        """Restore :meth:`state_dict`."""


CARRIED = (torch.Tensor, int, float, bool, str, type(None))


def pack_state(state: Any) -> dict[str, Any]:
    """A carried state as a checkpoint entry: any nesting of tuples, lists and dicts of tensors.

    ``torch.load(weights_only=True)`` reads such a structure back as it was (tuples stay
    tuples), so it is stored whole under ``"tree"``; the old format, a flat list of the
    ``(h, c)`` pairs, is still read by :func:`unpack_state`.

    Raises:
        TypeError: For a leaf that is not a tensor, a number, a string or ``None``.
    """
    _check_leaves(state)
    return {"tree": state}


def _check_leaves(state: Any) -> None:
    if isinstance(state, (tuple, list)):
        for item in state:
            _check_leaves(item)
    elif isinstance(state, dict):
        for item in state.values():
            _check_leaves(item)
    elif not isinstance(state, CARRIED):
        raise TypeError(f"a carried state cannot hold a {type(state).__name__}")


def unpack_state(stored: Any) -> Any:
    """Inverse of :func:`pack_state`; a flat list of ``(h, c)`` tensors (old checkpoints) too.

    Raises:
        ValueError: For anything else.
    """
    if isinstance(stored, dict) and set(stored) == {"tree"}:
        return stored["tree"]
    if isinstance(stored, list) and len(stored) % 2 == 0:  # flatten_state of ((h, c), ...)
        return unflatten_state(stored)
    raise ValueError(f"not a carried state: a {type(stored).__name__}")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, disable: bool, unit: str = "step") -> Any:
    """A tqdm bar on a terminal; nothing otherwise (or without tqdm)."""
    if disable or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)
