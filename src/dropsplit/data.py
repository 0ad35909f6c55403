"""Corpora from ``.txt.gz`` files (sha256-checked), vocabulary, batchify, TBPTT batches.

The data directory is ``--data DIR``, else the ``DROPSPLIT_DATA`` environment variable, else the
user cache (:func:`~dropsplit.fetch.cache_dir`), with the layout of ``shared/data``:
``ptb/{train,valid,test}.txt.gz``, ``wikitext-2/{train,valid,test}.txt.gz``,
``tinyshakespeare/input.txt.gz``. A corpus missing there is fetched (:mod:`dropsplit.fetch`)
unless ``download=False``. ``"ptb-char"`` and ``"wikitext-2-char"`` are those corpora read as
characters (a newline ends each line). ``"synthetic"`` is a small built-in corpus (a random
second-order Markov source) for tests and quick runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dropsplit.fetch import (
    BAD_GZIP,
    CHARACTER_READINGS,
    CORPUS_FILES,
    FetchError,
    cache_dir,
    decompressed_limit,
    fetch,
    files_of,
    gunzip_capped,
)

FILES = {f.relative: f for f in CORPUS_FILES}
CORPORA = (
    "ptb",
    "ptb-char",
    "wikitext-2",
    "wikitext-2-char",
    "wikitext-103",
    "tinyshakespeare",
    "synthetic",
)


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path``, else ``$DROPSPLIT_DATA``, else the user cache (created).

    Raises:
        FileNotFoundError: If a given directory does not exist.
    """
    chosen = path if path is not None else os.environ.get("DROPSPLIT_DATA")
    if not chosen:
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        return root
    root = Path(chosen)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    return root


def ensure_corpus(name: str, root: Path, download: bool = True) -> None:
    """Fetch the files of ``name`` missing from ``root`` (said on stderr), or say how to get them.

    Raises:
        FileNotFoundError: If a file is missing and cannot be fetched (the message gives the
            three ways to provide it).
    """
    missing = [f.relative for f in files_of(name) if not (root / f.relative).is_file()]
    if not missing:
        return
    reason = "--no-download was given"
    if download:
        print(f"dropsplit: {name} is not in {root}: fetching it", file=sys.stderr, flush=True)
        try:
            fetch([name], root)
            return
        except FetchError as err:
            reason = f"fetching it failed: {err}"
    raise FileNotFoundError(
        f"missing corpus file {root / missing[0]} ({reason}). Provide it in one of three ways: "
        f"`dropsplit data fetch {name} --to {root}` on a machine with internet (or with "
        f"--mirror URL / DROPSPLIT_MIRROR for a local copy); pass --data DIR for a directory "
        f"holding {missing[0]}; or set DROPSPLIT_DATA to such a directory"
    )


def read_text(root: Path, relative: str) -> str:
    """Read one corpus file and verify its checksum.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If its checksum does not match (a corrupt or different file).
    """
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"missing corpus file {path}; the data directory must hold {relative} "
            "(see shared/data/README.md)"
        )
    refetch = f"`dropsplit data fetch {relative.split('/')[0]} --to {root}` replaces it"
    file = FILES[relative]
    try:  # streamed and capped: a small file that inflates to gigabytes is stopped early
        raw = gunzip_capped(path, decompressed_limit(file))
    except BAD_GZIP as err:
        raise ValueError(f"corrupt corpus file {path} ({err}): {refetch}") from err
    digest = file.digest(raw)
    if digest != file.checksum:
        raise ValueError(
            f"corrupt corpus file {path}: {digest} does not match the expected "
            f"{file.checksum.split()[1]}; {refetch}"
        )
    return raw.decode("utf-8")


def word_tokens(text: str) -> list[str]:
    """Standard word-level tokens: ``line.split() + ["<eos>"]`` per line."""
    return [w for line in text.splitlines() for w in [*line.split(), "<eos>"]]


def char_tokens(text: str) -> list[str]:
    """Character tokens: each line's words joined by single spaces, then a newline.

    Runs of spaces collapse to one (the word-level files pad each line with spaces), so the
    character stream is the word-level stream spelled out; ``<unk>`` stays five characters.
    """
    return [c for line in text.splitlines() for c in " ".join(line.split()) + "\n"]


class Vocabulary:
    """Token <-> id map in order of first appearance in the training split."""

    def __init__(self, tokens: list[str]) -> None:
        self.itos: list[str] = list(dict.fromkeys(tokens))
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> torch.Tensor:
        """Ids of ``tokens``.

        Raises:
            ValueError: For a token outside the vocabulary.
        """
        try:
            return torch.tensor([self.stoi[t] for t in tokens], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"token {err.args[0]!r} is not in the vocabulary") from err


@dataclass
class Corpus:
    """Token ids of the three splits and the vocabulary."""

    name: str
    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


def load_corpus(
    name: str,
    root: str | os.PathLike | None = None,
    train_fraction: float = 1.0,
    download: bool = True,
) -> Corpus:
    """Load a corpus, verified, tokenized and encoded.

    Args:
        name: ``"ptb"``, ``"ptb-char"`` (PTB as characters), ``"wikitext-2"``,
            ``"wikitext-2-char"`` (WikiText-2 as characters), ``"wikitext-103"``,
            ``"tinyshakespeare"``
            (characters, 90/5/5 split) or ``"synthetic"``.
        root: Data directory (default ``$DROPSPLIT_DATA``, else the user cache); unused for
            ``"synthetic"``.
        train_fraction: Keep this leading fraction of the training tokens (the paper's
            data-size effect); deterministic. The vocabulary is built on the full split.
        download: Fetch the corpus when it is missing from the data directory.

    Returns:
        The :class:`Corpus`.

    Raises:
        ValueError: For an unknown name or a fraction outside ``(0, 1]``.
    """
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if name == "synthetic":
        ids = markov_corpus(vocab=16, length=60_000, seed=1234)
        vocab = Vocabulary([str(i) for i in range(16)])
        n = ids.numel()
        splits = ids[: int(0.8 * n)], ids[int(0.8 * n) : int(0.9 * n)], ids[int(0.9 * n) :]
        return Corpus(name, vocab, *_keep(splits, train_fraction))
    base = data_root(root)
    ensure_corpus(name, base, download)
    if name == "tinyshakespeare":
        text = read_text(base, "tinyshakespeare/input.txt.gz")
        vocab = Vocabulary(sorted(set(text)))
        ids = vocab.encode(list(text))
        n = ids.numel()
        splits = ids[: int(0.9 * n)], ids[int(0.9 * n) : int(0.95 * n)], ids[int(0.95 * n) :]
    else:
        folder = CHARACTER_READINGS.get(name, name)
        tokenize = char_tokens if name in CHARACTER_READINGS else word_tokens
        tokens = {
            s: tokenize(read_text(base, f"{folder}/{s}.txt.gz")) for s in ("train", "valid", "test")
        }
        vocab = Vocabulary(tokens["train"])
        splits = (
            vocab.encode(tokens["train"]),
            vocab.encode(tokens["valid"]),
            vocab.encode(tokens["test"]),
        )
    return Corpus(name, vocab, *_keep(splits, train_fraction))


def _keep(
    splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], train_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The splits with only the leading ``train_fraction`` of the training tokens."""
    train, valid, test = splits
    keep = max(2, int(round(train_fraction * train.numel())))
    return train[:keep], valid, test


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into ``batch_size`` columns: ``[T, B]`` (the remainder is dropped).

    Raises:
        ValueError: If the stream is shorter than two tokens per column.
    """
    steps = ids.numel() // batch_size
    if steps < 2:
        raise ValueError(f"{ids.numel()} tokens are too few for batch size {batch_size}")
    return ids[: steps * batch_size].view(batch_size, steps).T.contiguous()


def sequence_length(bptt: int, variable: bool, generator: torch.Generator | None) -> int:
    """AWD-LSTM's random BPTT length: ``N(bptt, 5)`` (``bptt/2`` w.p. 0.05), at least 5."""
    if not variable:
        return bptt
    if generator is None:
        raise ValueError("variable BPTT needs a generator")
    base = bptt if torch.rand((), generator=generator).item() >= 0.05 else bptt / 2
    length = int(base + 5 * torch.randn((), generator=generator).item())
    return max(5, length)


def bptt_batches(
    data: torch.Tensor,
    bptt: int,
    variable: bool = False,
    generator: torch.Generator | None = None,
    start: int = 0,
    max_length: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Truncated-BPTT windows of a batchified ``[T, B]`` stream.

    Args:
        data: ``[T, B]`` token ids.
        bptt: Nominal window length.
        variable: AWD's random length (needs ``generator``).
        generator: Source of the random lengths (its state makes resumption exact).
        start: Row to start from (resuming mid-epoch).
        max_length: Longest window (a Transformer's context): a longer random length is cut to
            it. The generator draws as without it, so windows that fit are unchanged.

    Yields:
        ``(start_row, inputs[L, B], targets[L, B])``.
    """
    i = start
    while i < data.shape[0] - 1:
        length = min(sequence_length(bptt, variable, generator), data.shape[0] - 1 - i)
        if max_length is not None:
            length = min(length, max_length)
        yield i, data[i : i + length], data[i + 1 : i + 1 + length]
        i += length


def markov_corpus(
    vocab: int = 8, length: int = 20_000, concentration: float = 0.3, seed: int = 0
) -> torch.Tensor:
    """Token stream from a random second-order Markov source (a synthetic language).

    Each context ``(x_{t-2}, x_{t-1})`` has its own next-token distribution drawn from a
    symmetric Dirichlet, so the best model is uncertain and ``H_out`` is far from zero.

    Returns:
        ``[length]`` int64 tokens.
    """
    g = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.full((vocab,), concentration), torch.ones(vocab))
    with torch.random.fork_rng():  # Gamma sampling takes no generator; keep the global RNG
        torch.manual_seed(seed)
        table = gamma.sample((vocab, vocab))
    table = table / table.sum(-1, keepdim=True)
    tokens = torch.empty(length, dtype=torch.long)
    tokens[:2] = torch.randint(0, vocab, (2,), generator=g)
    u = torch.rand(length, generator=g)
    cdf = table.cumsum(-1)
    for t in range(2, length):
        row = cdf[tokens[t - 2], tokens[t - 1]]
        tokens[t] = min(int(torch.searchsorted(row, u[t] * row[-1], right=True)), vocab - 1)
    return tokens
