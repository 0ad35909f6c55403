"""``hf-causal-lm``: a ``transformers`` causal LM built from the config, on the LMs' corpora.

The model is built from a config object, never downloaded: ``architecture = "gpt2"`` makes a
``GPT2LMHeadModel`` of ``GPT2Config(n_layer=layers, n_embd=hidden_size, n_head=heads,
n_positions=context, vocab_size=<the corpus's>, resid_pdrop, attn_pdrop, embd_pdrop)``, and
:func:`dropsplit.convert` turns its dropout (the attention's included) into sites. It trains on
the corpus of ``[data]`` as the language models do (the same columns, the same random windows
from the trainer's generator, the same evaluation windows of ``data.bptt``), but each window is
a sequence of its own: no state is carried between windows. ``transformers`` is an optional
extra (``pip install 'dropsplit[tasks]'``), imported when the model is built.

Its keys are the table ``[model.hf]`` (:class:`HFCausalLMConfig`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dropsplit.data import bptt_batches
from dropsplit.optional import require
from dropsplit.training.tasks.base import Evaluation, progress_bar
from dropsplit.training.tasks.lm import LanguageModelTask

if TYPE_CHECKING:
    from dropsplit.training.config import Config

ARCHITECTURES = ("gpt2",)


@dataclass(frozen=True)
class HFCausalLMConfig:
    """``[model.hf]``: the architecture, its sizes and its three dropout probabilities."""

    architecture: str = field(default="gpt2", metadata={"check": ARCHITECTURES})
    layers: int = field(default=2, metadata={"check": "positive"})
    hidden_size: int = field(default=64, metadata={"check": "positive"})
    heads: int = field(default=2, metadata={"check": "positive"})
    context: int = field(default=128, metadata={"check": "positive"})
    resid_pdrop: float = field(default=0.1, metadata={"check": "probability"})
    attn_pdrop: float = field(default=0.1, metadata={"check": "probability"})
    embd_pdrop: float = field(default=0.1, metadata={"check": "probability"})

    def check(self, config: Config) -> None:
        """The heads divide the width, and the context holds a window of ``data.bptt``.

        Raises:
            ValueError: Naming the key to change.
        """
        if self.hidden_size % self.heads:
            raise ValueError(
                f"model.hf.heads ({self.heads}) must divide model.hf.hidden_size "
                f"({self.hidden_size})"
            )
        if self.context < config.data.bptt:
            raise ValueError(
                f"model.hf.context ({self.context}) must be at least data.bptt "
                f"({config.data.bptt}); a longer random window keeps its last model.hf.context "
                "tokens"
            )


def build_gpt2(options: HFCausalLMConfig, vocab_size: int) -> nn.Module:
    """A converted ``GPT2LMHeadModel`` of ``options`` (random weights, no download).

    Raises:
        ModuleNotFoundError: One line naming the extra, without ``transformers``.
    """
    from dropsplit.integrations.convert import convert

    transformers = require("transformers", "the hf-causal-lm task", "dropsplit[tasks]")
    config = transformers.GPT2Config(
        n_layer=options.layers,
        n_embd=options.hidden_size,
        n_head=options.heads,
        n_positions=options.context,
        vocab_size=vocab_size,
        resid_pdrop=options.resid_pdrop,
        attn_pdrop=options.attn_pdrop,
        embd_pdrop=options.embd_pdrop,
        bos_token_id=0,
        eos_token_id=0,
    )
    with warnings.catch_warnings():  # its loading report, not ours
        warnings.simplefilter("ignore", FutureWarning)
        model = transformers.GPT2LMHeadModel(config)
    return convert(model)


class HFCausalLMTask(LanguageModelTask):
    """A ``transformers`` causal LM on a corpus: windows of tokens, no carried state."""

    model_fields = False
    section = "hf"
    options = HFCausalLMConfig
    size_keys = ("model.hf",)

    @property
    def opts(self) -> HFCausalLMConfig:
        """The ``[model.hf]`` keys (their defaults where the config has none)."""
        options = self.config.model.options
        return options if isinstance(options, HFCausalLMConfig) else HFCausalLMConfig()

    def build_model(self) -> nn.Module:
        """The converted model of ``[model.hf]`` (:func:`build_gpt2`)."""
        return build_gpt2(self.opts, len(self.corpus.vocab))

    def forward(self, model: nn.Module, batch: Any) -> tuple:
        """Next-token logits of ``inputs[T, B]``: ``(logits[T * B, V], targets[T * B])``.

        Flattened time-major, as :func:`~dropsplit.models.awd.lm_forward` does, so target ``i``
        belongs to sequence ``i % B`` (``column_examples``); a window longer than the context
        keeps its last ``context`` tokens.
        """
        inputs, targets = batch
        context = self.opts.context
        inputs, targets = inputs[-context:], targets[-context:]
        logits = model(input_ids=inputs.T).logits.transpose(0, 1)
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)

    def initial_state(self, model: nn.Module) -> Any:
        """None: each window is a sequence of its own."""
        return None

    def bind(self, batch: Any, state: Any) -> Any:
        """The window ``(inputs, targets)``."""
        return batch

    def carry(self, aux: Any) -> Any:
        """None."""
        return None

    def evaluate(
        self, model: nn.Module, split: str, max_batches: int = 0, show_progress: bool = False
    ) -> Evaluation:
        """Token-mean loss over windows of ``data.bptt``, each a sequence of its own."""
        data = {"valid": self.valid_data, "test": self.test_data}[split]
        bptt = self.config.data.bptt
        windows = -(-(data.shape[0] - 1) // bptt)
        bar = progress_bar(min(windows, max_batches or windows), 0, not show_progress, "window")
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for n, (_, x, y) in enumerate(bptt_batches(data, bptt)):
                if max_batches and n >= max_batches:
                    break
                bar.update(1)
                logits, targets = self.forward(model, (x, y))
                total += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
                count += targets.numel()
        bar.close()
        model.train(was_training)
        return Evaluation(total / count)
