"""A finished run directory: its config, corpus and best weights, and measurements on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch

from dropsplit.core.sites import sites
from dropsplit.data import Corpus, batchify, bptt_batches
from dropsplit.models import LanguageModel
from dropsplit.training.checkpoint import WriteError, load_checked, load_weights_into, save_json
from dropsplit.training.config import MODEL_NAMES, Config, load_config, string_override
from dropsplit.training.tasks import Task, task_class
from dropsplit.training.tasks.lm import LanguageModelTask
from dropsplit.training.threads import set_threads

RETRAIN = "train the run again (dropsplit train CONFIG --out RUN --overwrite) or put back its copy"


def writable_directory(directory: Path, what: str) -> Path:
    """Create ``directory`` and check it can be written, before any compute that ends there.

    Raises:
        WriteError: One line naming the directory and the fix.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(
            f"cannot write {what} to {directory}: {err.strerror or err}: choose another directory"
        ) from err
    if not os.access(directory, os.W_OK):
        raise WriteError(
            f"cannot write {what} to {directory}: the directory is read-only; make it writable "
            "or choose another directory"
        )
    return directory


def require_run(run: Path) -> None:
    """Refuse a directory that is not a run's.

    Raises:
        FileNotFoundError: If ``run`` has no ``config.toml``.
    """
    if not (Path(run) / "config.toml").is_file():
        raise FileNotFoundError(
            f"{run} is not a run directory (no config.toml, no checkpoint): give the --out "
            "directory of a `dropsplit train` run"
        )


def load_task_run(
    run: Path, data: str | None = None, threads: int = 0
) -> tuple[Config, Task, torch.nn.Module]:
    """Config, task (its data loaded) and the best weights of a run directory of any task.

    Also sets the process's thread count for the model
    (:func:`~dropsplit.training.threads.set_threads`).

    Args:
        run: The directory ``dropsplit train`` wrote.
        data: Data directory (default: the config's, else ``$DROPSPLIT_DATA``).
        threads: Intra-op threads (``0``: the run's ``train.threads``, else the rule).

    Raises:
        FileNotFoundError: If ``run`` is not a run directory or has no ``best.pt`` yet.
        ValueError: If ``best.pt`` is damaged or holds the weights of another model (one line).
    """
    require_run(run)
    config = load_config(run / "config.toml", [string_override("data.path", data)] if data else [])
    task = task_class(config.model.name)(config)
    model = task.build_model()
    set_threads(threads or config.train.threads, model)
    weights = run / "best.pt"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist: has the run evaluated yet?")
    load_weights_into(model, load_checked(weights, RETRAIN), weights, RETRAIN)
    return config, task, model


def load_run(
    run: Path, data: str | None = None, threads: int = 0
) -> tuple[Config, Corpus, LanguageModel]:
    """Config, corpus and the best weights of a language model's run (lstm, qrnn, transformer).

    Args:
        run: The directory ``dropsplit train`` wrote.
        data: Data directory (default: the config's, else ``$DROPSPLIT_DATA``).
        threads: Intra-op threads (``0``: the run's ``train.threads``, else the rule).

    Raises:
        FileNotFoundError: If ``run`` is not a run directory or has no ``best.pt`` yet.
        ValueError: If ``best.pt`` is damaged or holds the weights of another model, or the run
            is of another task (one line).
    """
    require_language_model(run)
    config, task, model = load_task_run(run, data, threads)
    if not isinstance(task, LanguageModelTask):  # a task registered under an LM's name
        raise ValueError(f"{run} is not the run of a language model: {type(task).__name__}")
    return config, task.corpus, cast(LanguageModel, model)


def require_language_model(run: Path) -> None:
    """Refuse a run of a task other than the paper's language models (before any file is made).

    Raises:
        FileNotFoundError: If ``run`` is not a run directory.
        ValueError: One line naming the run's task.
    """
    require_run(run)
    name = load_config(Path(run) / "config.toml").model.name
    if name not in MODEL_NAMES:
        raise ValueError(
            f"{run} is a model.name = {name!r} run: measure and noise-scale take the run of "
            f"one of the paper's language models ({', '.join(MODEL_NAMES)})"
        )


def _first_batches(
    model: LanguageModel, split: torch.Tensor, batch_size: int, bptt: int, n: int
) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
    """The first ``n`` BPTT batches of ``split``, each with the clean state the text before left."""
    stream = batchify(split, batch_size)
    chosen: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
    state = model.init_state(stream.shape[1])
    model.eval()
    with torch.no_grad():
        for _, x, y in bptt_batches(stream, bptt):
            if len(chosen) == n:
                break
            chosen.append((x, y, state))
            state = model(x, state)[1]
    model.train()
    return chosen


def measure_run(
    run: Path,
    *,
    batches: int = 2,
    gap_samples: int = 64,
    noise_samples: int = 32,
    full_samples: int = 0,
    q: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    data: str | None = None,
    threads: int = 0,
) -> tuple[dict[str, Any], Path, list[str]]:
    """:func:`~dropsplit.measure.effects.measure_effects` on validation batches of a trained run.

    Writes ``measure.json`` and the figures to ``out`` (default ``RUN/measure``). ``q``: measure
    with every dropping site at this probability instead of the trained ones (at small ``q``
    the second-order terms dominate the gap, so a prediction can be checked site by site);
    ``full_samples``: Hutchinson draws of the whole second-order term (0: skip).

    Returns:
        ``(measurement, out directory, figure file names)``.
    """
    from dropsplit.measure.effects import measure_effects, plot_effects
    from dropsplit.models.awd import lm_forward

    if q is not None and not 0.0 <= q < 1.0:
        raise ValueError(f"--q must be in [0, 1), got {q}")
    if batches < 1:
        raise ValueError(f"--batches must be at least 1, got {batches}")
    require_language_model(run)  # before creating anything in it
    out = writable_directory(Path(out) if out else run / "measure", "the measurement")
    config, corpus, model = load_run(run, data, threads)
    d = config.data
    if q is not None:
        for site in sites(model):
            site.p = q if site.p > 0 else site.p
    chosen = _first_batches(model, corpus.valid, d.eval_batch_size, d.bptt, batches)
    result = measure_effects(
        model,
        lm_forward,
        chosen,
        gap_samples=gap_samples,
        noise_samples=noise_samples,
        full_samples=full_samples,
        seed=seed,
        progress=True,
    )
    result["q"] = "trained" if q is None else q
    save_json(result, out / "measure.json")
    return result, out, plot_effects(result, out)


def noise_scale_run(
    run: Path,
    *,
    batches: int = 16,
    samples: int = 8,
    seed: int = 0,
    data: str | None = None,
    threads: int = 0,
) -> tuple[dict[str, Any], Path]:
    """:func:`~dropsplit.measure.effects.noise_scale` on training batches of a trained run.

    The first ``batches`` BPTT batches of the training text at the run's training batch size
    and its trained probabilities; writes ``RUN/noise_scale.json``.

    Returns:
        ``(measurement, path written)``.
    """
    from dropsplit.measure.effects import noise_scale
    from dropsplit.models.awd import lm_forward

    if batches < 2:
        raise ValueError(f"--batches must be at least 2 (a covariance needs two), got {batches}")
    require_language_model(run)
    writable_directory(Path(run), "noise_scale.json")
    config, corpus, model = load_run(run, data, threads)
    d = config.data
    chosen = _first_batches(model, corpus.train, d.batch_size, d.bptt, batches)
    if len(chosen) < batches:
        raise ValueError(f"the training text has only {len(chosen)} batches, asked {batches}")
    result = noise_scale(model, lm_forward, chosen, samples=samples, seed=seed)
    result["batch_size"] = config.data.batch_size
    path = run / "noise_scale.json"
    save_json(result, path)
    return result, path
