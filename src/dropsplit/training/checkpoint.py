"""Files of a run directory, written so that a kill never leaves half a file behind.

Every write goes through a temporary file of its own (a unique name beside the target, so two
writers never share one), is flushed to the disk (``fsync``) and renamed into place, and the
directory is synced after the rename, so a power cut leaves the old file or the new one, whole;
``truncate_metrics`` drops the evaluations logged after the checkpoint a run resumes from, so no
line is duplicated. :class:`RunLock` makes a run directory one trainer's at a time.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

State = tuple[tuple[torch.Tensor, torch.Tensor], ...] | None
LOCK_NAME = ".dropsplit.lock"
TEMPORARY_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file of a run that could not be written (disk full, read-only directory); one line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk, where the system allows."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some systems (Windows) cannot open a directory: nothing to sync
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not directory or err.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A fresh name beside ``path`` for its next version (``.NAME.<pid>.<random>.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def write_failure(path: Path, err: BaseException) -> WriteError:
    """A one-line :class:`WriteError` for a failed write of ``path`` that says what to do."""
    code = getattr(err, "errno", None)
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if code == errno.ENOSPC or "enforce fail" in text or "file write failed" in text:
        reason = "the disk is full" if code == errno.ENOSPC else f"the write failed ({text[:200]})"
        return WriteError(
            f"cannot write {path}: {reason}: free disk space (or choose a directory on another "
            "disk), then run the same command again"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(
            f"cannot write {path}: {getattr(err, 'strerror', None) or text}: the directory is "
            "read-only; make it writable or choose another directory"
        )
    return WriteError(f"cannot write {path}: {getattr(err, 'strerror', None) or text[:200]}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file, fsync and rename, so a reader never sees half a file.

    ``write(tmp)`` writes the whole content to ``tmp``; the temporary name is unique to this
    call (two processes writing the same file never rename each other's half).

    Raises:
        WriteError: If the file cannot be written (disk full, read-only directory), one line that
            names the file; the temporary file is removed and the old ``path`` left as it was.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_failure(path, err) from err
    _fsync(path.parent, directory=True)


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda p: torch.save(obj, p))


def save_json(obj: Any, path: Path) -> None:
    """JSON atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def save_text(text: str, path: Path) -> None:
    """Text atomically."""
    atomic_write(path, lambda p: p.write_text(text))


def _reason(err: BaseException, path: Path | None = None) -> str:
    """Why ``torch.load`` failed, in a few words (torch's own messages run to pages)."""
    text = str(err)
    if path is not None and path.is_file() and path.stat().st_size == 0:
        return "an empty file"
    if "failed finding central directory" in text or "PytorchStreamReader" in text:
        return "truncated, or not a file torch.save wrote"
    if "WeightsUnpickler error:" in text:  # not a torch file, or a pickle with code in it
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the")[0].split())
        return f"not a file of tensors, refused unread: {detail[:80]}"
    if isinstance(err, EOFError):
        return "the file ends early"
    lines = text.strip().splitlines()
    first = lines[0] if lines else type(err).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def damaged(path: Path, reason: str, fix: str) -> ValueError:
    """One line for a run file that cannot be used: the file, why, and what to do."""
    return ValueError(f"{path} is damaged ({reason}): {fix}")


def load_checked(path: Path, fix: str, map_location: Any = "cpu", keys: tuple = ()) -> Any:
    """``torch.load(path, weights_only=True)``, every failure one line naming the file and ``fix``.

    ``keys``: the entries a dict must hold (a checkpoint); with no keys any object is returned.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is truncated, empty, not a torch file, holds code (refused by
            ``weights_only``) or lacks one of ``keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {fix}")
    try:
        obj = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as err:  # zip, pickle, EOF and weights_only errors alike: the file is bad
        raise damaged(path, _reason(err, path), fix) from err
    if keys:
        if not isinstance(obj, dict):
            raise damaged(path, f"holds a {type(obj).__name__}, not a checkpoint", fix)
        missing = [k for k in keys if k not in obj]
        if missing:
            raise damaged(path, f"no {', '.join(missing)}", fix)
    return obj


def load_weights_into(module: torch.nn.Module, state: Any, path: Path, fix: str) -> None:
    """``module.load_state_dict(state)``; weights of another model are one line naming ``path``.

    Raises:
        ValueError: If ``state`` is not a state dict of ``module`` (missing or unexpected keys,
            wrong shapes).
    """
    check_weights(module.state_dict(), state, path, fix)
    module.load_state_dict(state)


def check_weights(expected: dict[str, torch.Tensor], state: Any, path: Path, fix: str) -> None:
    """Refuse a ``state`` that is not a state dict with the keys and shapes of ``expected``.

    Raises:
        ValueError: One line naming ``path``, the first difference and ``fix``.
    """
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise damaged(path, "not a state dict of weights", fix)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or shapes:
        what = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {extra[0]}"
            if extra
            else f"{shapes[0]} has shape {tuple(state[shapes[0]].shape)}, the model "
            f"{tuple(expected[shapes[0]].shape)}"
        )
        raise damaged(path, f"weights of another model: {what}", fix)


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


class RunInUseError(FileExistsError):
    """Another process trains in the run directory (its PID is in the message)."""

    def __str__(self) -> str:
        return str(self.args[0])


class RunLock:
    """An exclusive lock on a run directory while one process trains in it.

    An ``flock`` on ``DIR/.dropsplit.lock``, which holds the PID of its holder (for the message of
    the process refused). The system drops the lock when its process ends in any way (``kill -9``
    included), so a lock is never stale; the file itself stays (removing it would let a second
    process lock a new file while a third still holds the old one).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._file: Any = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            RunInUseError: If another process holds it (one line naming its PID).
        """
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run unlocked
            return
        handle = open(self.path, "a+")  # noqa: SIM115 (held open while the lock is held)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read(32).strip() or "unknown"
            handle.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise write_failure(self.path, err) from err
            raise RunInUseError(
                f"{self.directory} is in use by another dropsplit process (PID {holder}): wait "
                "for it to end (or stop it), or give another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drop the lock (a second call does nothing)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
