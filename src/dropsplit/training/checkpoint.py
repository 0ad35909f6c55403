"""Files of a run directory, written so that a kill never leaves half a file behind.

Every write goes through a temporary file and a rename; ``truncate_metrics`` drops the
evaluations logged after the checkpoint a run resumes from, so no line is duplicated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

State = tuple[tuple[torch.Tensor, torch.Tensor], ...] | None


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
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


def flatten_state(state: State) -> list[torch.Tensor]:
    """A per-layer ``((h, c), ...)`` state as a flat list (checkpoint friendly)."""
    return [] if state is None else [t for pair in state for t in pair]


def unflatten_state(flat: list[torch.Tensor]) -> State:
    """Inverse of :func:`flatten_state`."""
    return None if not flat else tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop evaluations logged after the checkpoint we resume from (and a torn last line).

    Raises:
        ValueError: If a line other than the last is not JSON (a corrupt file, named).
    """
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # a kill during the write: the line is after the checkpoint
                break
            raise ValueError(
                f"{path} line {i + 1} is not JSON ({err}): the file is corrupt"
            ) from err
        if record["step"] <= step:
            kept.append(line)
    atomic_write(path, lambda p: p.write_text("".join(ln + "\n" for ln in kept)))
