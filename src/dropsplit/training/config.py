"""Experiment configuration: frozen dataclasses loaded from TOML with ``--set key=value``.

A config file has the sections ``[data]``, ``[model]``, ``[method]`` (with its table
``[method.estimator]``: the options of the chosen gradient estimator), ``[optim]`` and
``[train]``; anything left out keeps its default. ``--set method.name=analytic`` overrides one
key (the value is read as a TOML value, so ``--set optim.lr=20`` is a number and
``--set method.noise=difference`` a string), ``--set method.estimator.step=1e-4`` one option
of a table. Unknown keys, wrong types and values outside a key's choices are errors that name
the key.

``model.name`` picks a task of :data:`~dropsplit.training.tasks.TASKS`, and each task owns its
keys. The language models (``lstm``, ``qrnn``, ``transformer``) read the flat keys of
``[model]`` (:class:`ModelConfig`, as every config written before tasks did, so old files load
and resolve to the same ``config.toml``); their cross-key checks (the Transformer's heads and
context) are the task's own. Any other task keeps its keys in a table of its own,
``[model.<section>]`` (e.g. ``[model.hf]`` of ``hf-causal-lm``, ``[model.mlp]`` of
``digits-mlp``; ``--set model.hf.layers=4``), parsed into the task's frozen dataclass
(``config.model.options``), which checks its values and names the key. A key of another family
is refused, not ignored: a flat language-model key under ``model.name = "digits-mlp"``, a table
of another task, or a ``[data]`` key the task does not read (``data.corpus`` for the digits).
The resolved ``config.toml`` of such a run holds ``name``, its table and the ``[data]`` keys it
reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dropsplit.core.explicit import CURVATURES
from dropsplit.core.sites import GROUPINGS
from dropsplit.data import CORPORA
from dropsplit.estimators import ESTIMATORS, GRADIENTS
from dropsplit.estimators.legacy import legacy_config
from dropsplit.methods import NOISES, REPLICATIONS
from dropsplit.models.lstm import IMPLEMENTATIONS
from dropsplit.models.qrnn import FORGET_MULTS

# NoDropout, DropoutK, Analytic, RDrop, Fraternal
METHOD_NAMES = ("none", "dropout", "analytic", "rdrop", "fraternal")
MODEL_NAMES = ("lstm", "qrnn", "transformer")
OPTIMIZERS = ("sgd", "adam", "adamw", "ntasgd")
DIVERGENCE_ACTIONS = ("skip", "restore")


@dataclass(frozen=True)
class DataConfig:
    """Corpus and batching."""

    corpus: str = "ptb"
    path: str = ""  # "" means $DROPSPLIT_DATA, else the user cache
    download: bool = True  # fetch a corpus missing from the data directory
    train_fraction: float = 1.0
    batch_size: int = 20
    eval_batch_size: int = 10
    test_batch_size: int = 1
    bptt: int = 35
    variable_bptt: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """The model: ``name`` picks the task; the flat keys are the language models'.

    ``lstm`` and ``qrnn`` (AWD-style, :mod:`dropsplit.models.awd`) use ``embedding_size``,
    ``hidden_size``, ``layers``, ``p_input``, ``p_hidden``, ``p_output``, ``p_weight``
    (DropConnect: ``W_hh`` of the LSTM, the input-to-gates weight of the QRNN), ``p_embedding``,
    ``tie_weights``; ``implementation`` is the LSTM's kernel, ``forget_mult`` the QRNN's.
    ``transformer`` (:class:`~dropsplit.models.transformer.TransformerLM`) uses
    ``embedding_size`` (the width), ``hidden_size`` (the MLP width), ``layers``, ``heads``,
    ``context``, ``p_input``, ``p_attention``, ``p_attn_out``, ``p_mlp_hidden``, ``p_mlp_out``,
    ``p_output``, ``tie_weights``. ``context`` is at least ``data.bptt``; a variable window
    (``data.variable_bptt``) that would run longer is cut to it.

    Any other task of :data:`~dropsplit.training.tasks.TASKS` reads none of these: its keys
    are the table ``[model.<section>]``, parsed into its dataclass as ``options`` (``None`` for
    the language models, and never written as a key of ``[model]``).
    """

    name: str = "lstm"
    embedding_size: int = 200
    hidden_size: int = 400
    layers: int = 3
    p_input: float = 0.4
    p_hidden: float = 0.4
    p_output: float = 0.4
    p_weight: float = 0.4
    p_embedding: float = 0.0
    tie_weights: bool = True
    implementation: str = "fused"
    forget_mult: str = "scan"
    heads: int = 4
    context: int = 128
    p_attention: float = 0.1
    p_attn_out: float = 0.1
    p_mlp_hidden: float = 0.0
    p_mlp_out: float = 0.1
    # the task's own keys ([model.<section>]), a frozen dataclass; None for the language models
    options: Any = None


@dataclass(frozen=True)
class MethodConfig:
    """Which gradient maker, with its options (see :mod:`dropsplit.methods`).

    ``name``: ``"none"``, ``"dropout"`` (``k``, ``noise``, ``implementation``), ``"analytic"``
    (``curvature``, ``implicit``, scales, ``gradient``, the lazy intervals ``explicit_every`` /
    ``implicit_every`` and the schedule's ``start_step``), ``"rdrop"`` (``alpha``) or
    ``"fraternal"`` (``kappa``) of :mod:`dropsplit.baselines`.

    ``estimator`` (the TOML table ``[method.estimator]``) holds the options of the estimator
    that ``gradient`` names, checked by its class
    (:meth:`~dropsplit.estimators.base.Estimator.from_config`); a loaded config holds every
    option with its value (defaults filled in). The older keys ``hvp_step``, ``fd_epsilon``
    and ``fd_per_example`` load into it (:mod:`dropsplit.estimators.legacy`).

    The choices of each key come from the library's own constants (:data:`CHOICES`).
    """

    name: str = "dropout"
    k: int = 1
    noise: str = "none"
    implementation: str = "loop"
    curvature: str = "sampled"
    implicit: bool = True
    explicit_scale: float = 1.0
    implicit_scale: float = 1.0
    grouping: str = "mask"
    gradient: str = "double-backward"
    estimator: dict[str, Any] = field(default_factory=dict)
    alpha: float = 0.5
    kappa: float = 0.15
    explicit_every: int = 1
    implicit_every: int = 1
    start_step: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer: SGD with AWD's settings, Adam, AdamW or NT-ASGD (SGD, then averaging).

    ``weight_decay`` is the l2 penalty's coefficient, added to the gradient (coupled), for SGD and
    Adam; AdamW decays the weights apart from the adaptive step (decoupled, Loshchilov & Hutter).
    """

    name: str = "sgd"
    lr: float = 30.0
    clip: float = 0.25
    weight_decay: float = 1.2e-6
    nonmono: int = 5
    decay_after: int = 0  # lr * lr_decay after this epoch (0: never; AWD's --when)
    lr_decay: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Loop, evaluation, checkpoints and the divergence guard."""

    epochs: int = 1
    max_steps: int = 0
    seed: int = 1111
    eval_every: int = 0
    max_eval_batches: int = 0
    patience: int = 0
    min_epochs: int = 0
    checkpoint_every: int = 100
    log_every: int = 50
    divergence: str = "skip"
    divergence_factor: float = 3.0
    max_skips: int = 10  # consecutive skipped steps that stop the run as diverged (0: never)
    device: str = "cpu"
    threads: int = 0  # intra-op threads (0: the rule of dropsplit.training.threads)


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "data.corpus": CORPORA,
    "model.implementation": IMPLEMENTATIONS,
    "model.forget_mult": FORGET_MULTS,
    "method.name": METHOD_NAMES,
    "method.noise": ("none", *NOISES),
    "method.implementation": REPLICATIONS,
    "method.curvature": (*CURVATURES, "none"),
    "method.grouping": GROUPINGS,
    "method.gradient": GRADIENTS,
    "optim.name": OPTIMIZERS,
    "train.divergence": DIVERGENCE_ACTIONS,
}
POSITIVE = {
    "data.batch_size",
    "data.eval_batch_size",
    "data.test_batch_size",
    "data.bptt",
    "model.embedding_size",
    "model.hidden_size",
    "model.layers",
    "model.heads",
    "model.context",
    "method.k",
    "method.explicit_every",
    "method.implicit_every",
    "optim.lr",
    "optim.lr_decay",
    "train.epochs",
    "train.checkpoint_every",
    "train.log_every",
    "train.divergence_factor",
    "optim.nonmono",
}
NON_NEGATIVE = {
    "optim.clip",  # 0: no clipping
    "optim.weight_decay",
    "train.max_skips",
    "optim.decay_after",
    "method.alpha",
    "method.kappa",
    "method.start_step",
    "train.max_steps",
    "train.eval_every",
    "train.max_eval_batches",
    "train.patience",
    "train.min_epochs",
    "train.threads",
}
PROBABILITIES = {
    "model.p_input",
    "model.p_hidden",
    "model.p_output",
    "model.p_weight",
    "model.p_embedding",
    "model.p_attention",
    "model.p_attn_out",
    "model.p_mlp_hidden",
    "model.p_mlp_out",
}


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (an error line never echoes megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def _check_value(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is dict:
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"config key {key} must be a {kind.__name__}, got {_shown(value)}")
    if kind is float and not math.isfinite(value):  # nan passes every comparison below
        raise ValueError(f"config key {key} must be a finite number, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"config key {key} must be one of {CHOICES[key]}, got {_shown(value)}")
    if key in POSITIVE and value <= 0:
        raise ValueError(f"config key {key} must be positive, got {value!r}")
    if key in NON_NEGATIVE and value < 0:
        raise ValueError(f"config key {key} must be >= 0, got {value!r}")
    if key in PROBABILITIES and not 0 <= value < 1:
        raise ValueError(f"config key {key} must be in [0, 1), got {value!r}")
    if key == "data.train_fraction" and not 0 < value <= 1:
        raise ValueError(f"config key {key} must be in (0, 1], got {value!r}")
    return value


RENAMED = {"method.explicit": "method.curvature"}  # old key -> its one word (deprecated)


def _renamed(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each deprecated key of ``section`` under its new name (warned)."""
    out = dict(values)
    for old, new in RENAMED.items():
        old_section, old_key = old.split(".")
        if old_section != section or old_key not in out:
            continue
        new_key = new.split(".")[1]
        if new_key in out:
            raise ValueError(f"config has both {old} and {new}; keep {new}")
        warnings.warn(
            f"config key {old} is deprecated: use {new}", DeprecationWarning, stacklevel=3
        )
        out[new_key] = out.pop(old_key)
    return out


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested dicts, checking every key and value.

    Raises:
        ValueError: For an unknown section or key, a wrong type or a bad value.
    """
    sections = {f.name: f for f in dataclasses.fields(Config)}
    defaults_config = Config()
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ValueError(f"unknown config section [{name}]; sections are {sorted(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"config section [{name}] must be a table")
    _, options = _task_options(raw.get("model", {}), raw.get("data", {}))
    for name in sections:
        section = getattr(defaults_config, name)
        defaults = {k: v for k, v in dataclasses.asdict(section).items() if k != "options"}
        values = _renamed(name, raw.get(name, {}))
        if name == "model":
            values = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if name == "method":
            values = legacy_config(values, values.get("gradient", section.gradient))
        for key in values:
            if key not in defaults:
                raise ValueError(f"unknown config key {name}.{key}; keys are {sorted(defaults)}")
        checked = {k: _check_value(f"{name}.{k}", v, defaults[k]) for k, v in values.items()}
        if name == "model":
            checked["options"] = options
        built[name] = type(section)(**checked)
    built["method"] = _with_estimator(built["method"])
    config = Config(**built)
    _check_together(config)
    return config


def _with_estimator(method: MethodConfig) -> MethodConfig:
    """``method`` with every option of its estimator (``[method.estimator]``), checked.

    The estimator's class checks the options (an unknown key lists those it takes); the
    defaults fill in the rest, so the old keys, a table that spells out a default and no
    table at all give the same config.

    Raises:
        ValueError: Naming ``[method.estimator]`` and what the estimator refused.
    """
    cls = ESTIMATORS[method.gradient]
    try:
        cls.from_config(method.estimator)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config [method.estimator]: {err}") from None
    return dataclasses.replace(method, estimator={**cls.config_options(), **method.estimator})


def _check_together(config: Config) -> None:
    """Checks across keys, each error naming the key to change."""
    try:
        torch.device(config.train.device)
    except RuntimeError:
        raise ValueError(
            f"config key train.device must name a device (cpu, cuda, cuda:N, mps), got "
            f"{_shown(config.train.device)}"
        ) from None
    from dropsplit.training.tasks import task_class

    task_class(config.model.name).check(config)  # the family's own checks across keys


def _task_options(model: Any, data: Any) -> tuple[type, Any]:
    """The task ``model.name`` names and its own keys parsed, refusing another family's keys.

    Raises:
        ValueError: For an unknown ``model.name`` (listing the tasks), a table of another task,
            a flat language-model key for a task with its own table, a ``[data]`` key the task
            does not read, or a bad key of its table (named).
    """
    from dropsplit.training.tasks import task_class

    if not isinstance(model, dict) or not isinstance(data, dict):
        return task_class("lstm"), None  # from_dict names the section that is not a table
    name = model.get("name", ModelConfig.name)
    if not isinstance(name, str):
        raise ValueError(f"config key model.name must be a str, got {_shown(name)}")
    task = task_class(name)
    for key, value in model.items():
        if isinstance(value, dict) and key != task.section:
            own = f"its keys go in [model.{task.section}]" if task.section else "no table"
            raise ValueError(
                f"config table [model.{key}] is not for model.name = {name!r}, which takes {own}"
            )
        if not isinstance(value, dict) and key != "name" and not task.model_fields:
            raise ValueError(
                f"config key model.{key} is not a key of model.name = {name!r}: its keys go in "
                f"[model.{task.section}] ({', '.join(_option_names(task.options))})"
            )
    if task.data_keys is not None:
        for key in data:
            if key not in task.data_keys:
                raise ValueError(
                    f"config key data.{key} is not read by model.name = {name!r} (it reads "
                    f"{', '.join('data.' + k for k in task.data_keys)}): leave it out"
                )
    if task.options is None:
        return task, None
    return task, _parse_options(task.options, f"model.{task.section}", model.get(task.section, {}))


def _option_names(cls: type | None) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else []


def _parse_options(cls: type, prefix: str, values: dict[str, Any]) -> Any:
    """A task's table parsed into its dataclass; each field's ``metadata["check"]`` applied.

    ``check``: ``"positive"``, ``"probability"`` (in ``[0, 1)``) or a tuple of choices; a
    tuple default takes a list of positive integers.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown config key {prefix}.{key}; keys are {sorted(fields)}")
        name, f = f"{prefix}.{key}", fields[key]
        if isinstance(f.default, tuple):
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
            )
            if not ok:
                raise ValueError(
                    f"config key {name} must be a list of positive integers, got {_shown(value)}"
                )
            value = tuple(value)
        else:
            value = _check_value(name, value, f.default)
        check = f.metadata.get("check")
        if check == "positive" and value <= 0:
            raise ValueError(f"config key {name} must be positive, got {value!r}")
        if check == "probability" and not 0 <= value < 1:
            raise ValueError(f"config key {name} must be in [0, 1), got {value!r}")
        if isinstance(check, tuple) and value not in check:
            raise ValueError(f"config key {name} must be one of {check}, got {_shown(value)}")
        checked[key] = value
    return cls(**checked)


def string_override(key: str, value: str) -> str:
    """``key="value"`` with ``value`` quoted for TOML (quotes, backslashes: Windows paths)."""
    return f"{key}={json.dumps(value)}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` or ``section.table.key=value``; the value is read as TOML.

    A value that is not TOML is kept as a string.

    Raises:
        ValueError: If the text has no ``=`` or the key is not ``section.key`` or
            ``section.table.key``.
    """
    if "=" not in text:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--set key must be section.key or section.table.key, got {key!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return parts, parsed


def find_config(path: str | Path) -> Path:
    """``path`` if it exists, else the copy of ``configs/...`` shipped in the package.

    So ``dropsplit reproduce`` and ``dropsplit train configs/ptb-small.toml`` work outside a clone
    (after ``pip install dropsplit``) with the paths the README gives.
    """
    path = Path(path)
    if path.exists() or not path.parts or path.parts[0] != "configs":
        return path
    shipped = Path(str(resources.files("dropsplit").joinpath(*path.parts)))
    return shipped if shipped.exists() else path


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a TOML config and apply ``section.key=value`` overrides.

    Args:
        path: A TOML file (``None``: defaults only).
        overrides: ``--set`` strings, applied in order.

    Returns:
        The validated, frozen :class:`Config`.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = find_config(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from err
        except OSError as err:
            raise ValueError(f"config file {path} cannot be read: {err.strerror}") from err
    for text in overrides:
        (section, *keys), value = parse_override(text)
        table = raw.setdefault(section, {})
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ValueError(f"--set {text!r}: {section}.{key} is not a table")
        table[keys[-1]] = value
    return from_dict(raw)


# keys that may differ when a run is resumed: how long it goes on and where things are, not what
# it trains
RESUMABLE = (
    "train.threads",  # the speed, not the numbers (up to the rounding of another thread count)
    "data.path",
    "data.download",
    "train.epochs",
    "train.max_steps",
    "train.min_epochs",
    "train.patience",
    "train.checkpoint_every",
    "train.log_every",
    "train.device",
    "train.max_skips",
)


def check_resumable(saved: Path, config: Config) -> None:
    """Refuse to resume a run with a config that differs in a key outside :data:`RESUMABLE`.

    Raises:
        ValueError: Naming each changed key, its value in the run and the new one.
    """
    old, new = to_dict(load_config(saved)), to_dict(config)
    changed = [
        f"{section}.{key} {old[section].get(key)!r} -> {new[section].get(key)!r}"
        for section in old
        for key in {**old[section], **new[section]}
        if old[section].get(key) != new[section].get(key) and f"{section}.{key}" not in RESUMABLE
    ]
    if changed:
        raise ValueError(
            f"--resume with a changed config: {'; '.join(changed)} (the run has the values of "
            f"{saved}); only {', '.join(RESUMABLE)} may change on resume: start a new run "
            "(another --out) to change the others"
        )


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as nested dicts: of ``[model]`` and ``[data]``, the keys its task reads.

    A language model's config is the dataclasses as they are (the flat ``[model]``); another
    task's ``[model]`` holds ``name`` and its table of options.
    """
    from dropsplit.training.tasks import task_class

    out = dataclasses.asdict(config)
    model = out["model"]
    options = model.pop("options")
    task = task_class(config.model.name)
    if not task.model_fields:
        out["model"] = {"name": model["name"]}
        if task.section is not None:
            out["model"][task.section] = options or {}
    if task.data_keys is not None:
        out["data"] = {k: v for k, v in out["data"].items() if k in task.data_keys}
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config: Config) -> str:
    """Write the resolved config as TOML: sections of scalars, then their tables.

    A table-valued key (the ``estimator``, a task's options) is its own ``[section.key]`` after
    the section's scalars, left out when empty.
    """
    lines = []
    for section, values in to_dict(config).items():
        tables = [(f"{section}.{k}", v) for k, v in values.items() if isinstance(v, dict) and v]
        for name, table in [(section, values), *tables]:
            lines.append(f"[{name}]")
            lines += [
                f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)
            ]
            lines.append("")
    return "\n".join(lines)
