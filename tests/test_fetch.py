"""Fetching the corpora, against a local HTTP server (ranges, 404s, corrupt files, no network)."""

import gzip
import os
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dropsplit import data, fetch
from dropsplit.cli import main

REAL = Path(os.environ.get("DROPSPLIT_DATA", Path(__file__).parents[2] / "shared" / "data"))
SHAKESPEARE = REAL / "tinyshakespeare" / "input.txt.gz"
pytestmark = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"real corpora not found at {REAL} (set DROPSPLIT_DATA)"
)


class RangeHandler(SimpleHTTPRequestHandler):
    """A static file server that honours ``Range: bytes=N-`` and records the requests."""

    seen: list = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def send_head(self):
        self.seen.append((self.path, self.headers.get("Range")))
        wanted = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not wanted or not path.is_file():
            return super().send_head()
        start = int(wanted.removeprefix("bytes=").rstrip("-"))
        body = path.read_bytes()
        if start >= len(body):
            self.send_error(416)
            return None
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        f = open(path, "rb")  # noqa: SIM115 (the base class copies and closes it)
        f.seek(start)
        return f


@pytest.fixture
def server(tmp_path):
    """A mirror with our layout (tinyshakespeare only) at http://127.0.0.1:PORT."""
    root = tmp_path / "mirror"
    (root / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(SHAKESPEARE, root / "tinyshakespeare" / "input.txt.gz")
    RangeHandler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_verify_and_list_through_the_cli(server, tmp_path, capsys):
    _, url = server
    target = tmp_path / "data"
    assert main(["data", "fetch", "tinyshakespeare", "--to", str(target), "--mirror", url]) == 0
    assert gzip.decompress((target / "tinyshakespeare" / "input.txt.gz").read_bytes()) == (
        gzip.decompress(SHAKESPEARE.read_bytes())
    )
    assert main(["data", "fetch", "tinyshakespeare", "--to", str(target), "--mirror", url]) == 0
    assert "present, checksum ok" in capsys.readouterr().err
    assert main(["data", "list", "--data", str(target)]) == 0
    assert "tinyshakespeare/input.txt.gz" in capsys.readouterr().out
    assert main(["data", "verify", str(target)]) == 0  # the other corpora: not fetched
    assert "wikitext-2/                    not fetched" in capsys.readouterr().out


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    _, url = server
    part = tmp_path / "data" / "tinyshakespeare" / "input.txt.gz.part"
    part.parent.mkdir(parents=True)
    half = SHAKESPEARE.read_bytes()[: SHAKESPEARE.stat().st_size // 2]
    part.write_bytes(half)
    assert (
        main(["data", "fetch", "tinyshakespeare", "--to", str(tmp_path / "data"), "--mirror", url])
        == 0
    )
    assert ("/tinyshakespeare/input.txt.gz", f"bytes={len(half)}-") in RangeHandler.seen
    assert not part.exists()
    assert fetch.is_present(tmp_path / "data", fetch.files_of("tinyshakespeare")[0])


def test_a_corrupt_download_is_rejected_and_not_kept(server, tmp_path, capsys):
    root, url = server
    served = root / "tinyshakespeare" / "input.txt.gz"
    raw = bytearray(gzip.decompress(served.read_bytes()))
    raw[1000] ^= 1
    served.write_bytes(gzip.compress(bytes(raw)))
    target = tmp_path / "data"
    assert main(["data", "fetch", "tinyshakespeare", "--to", str(target), "--mirror", url]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and "Traceback" not in err
    assert not (target / "tinyshakespeare").exists()  # no file, no part, no folder it made


def test_http_errors_and_no_network_are_one_line(server, tmp_path, capsys):
    _, url = server
    target = str(tmp_path / "data")
    assert main(["data", "fetch", "ptb", "--to", target, "--mirror", url]) == 2
    assert "HTTP 404" in capsys.readouterr().err
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens
    assert main(["data", "fetch", "tinyshakespeare", "--to", target, "--mirror", closed]) == 2
    assert "network failure" in capsys.readouterr().err


def test_canonical_plain_text_is_gzipped_deterministically(server, tmp_path, monkeypatch):
    """A canonical source serves plain text: stored as ``gzip -9 -n`` of it, byte-stable."""
    root, url = server
    (root / "input.txt").write_bytes(gzip.decompress(SHAKESPEARE.read_bytes()))
    file = fetch.files_of("tinyshakespeare")[0]
    local = fetch.CorpusFile(file.corpus, file.name, file.sha256, f"{url}/input.txt", file.bytes, 0)
    monkeypatch.setattr(fetch, "CORPUS_FILES", (local,))
    monkeypatch.setattr(fetch, "files_of", lambda name: (local,))
    monkeypatch.delenv("DROPSPLIT_MIRROR", raising=False)
    first, second = tmp_path / "a", tmp_path / "b"
    fetch.fetch(["tinyshakespeare"], first, progress=False)
    fetch.fetch(["tinyshakespeare"], second, progress=False)
    a = (first / file.relative).read_bytes()
    assert a == (second / file.relative).read_bytes()
    assert a == gzip.compress(gzip.decompress(a), compresslevel=9, mtime=0)


def _archive_corpus(root, url, texts, monkeypatch):
    """A WikiText-103-like corpus: three members of one zip at the server, sha1-checked."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(root / "wt.zip", "w") as z:
        for split, text in texts.items():
            z.writestr(f"wt/wiki.{split}.tokens", text)
    files = tuple(
        fetch.CorpusFile(
            "wikitext-103",
            f"{split}.txt.gz",
            "",
            f"{url}/wt.zip",
            0,
            0,
            sha1=hashlib.sha1(b"Sword play\n" if split == "train" else text).hexdigest(),
            member=f"wt/wiki.{split}.tokens",
        )
        for split, text in texts.items()
    )
    monkeypatch.setattr(fetch, "CORPUS_FILES", files)
    monkeypatch.setattr(data, "FILES", {f.relative: f for f in files})
    monkeypatch.delenv("DROPSPLIT_MIRROR", raising=False)
    return files


def test_an_archive_is_fetched_once_extracted_verified_and_deleted(server, tmp_path, monkeypatch):
    """WikiText-103's route: one zip download for its three files, each checked by sha1,
    stored as gzip -9 -n; the archive goes once every member is stored."""
    root, url = server
    texts = {"train": b"Sword play\n", "valid": b"play Sword\n", "test": b"Sword\n"}
    _archive_corpus(root, url, texts, monkeypatch)
    target = tmp_path / "data"
    RangeHandler.seen = []
    fetch.fetch(["wikitext-103"], target, progress=False)
    assert [path for path, _ in RangeHandler.seen] == ["/wt.zip"]
    for split, text in texts.items():
        stored = (target / "wikitext-103" / f"{split}.txt.gz").read_bytes()
        assert stored == gzip.compress(text, compresslevel=9, mtime=0)
    assert sorted(p.name for p in (target / "wikitext-103").iterdir()) == [
        "test.txt.gz",
        "train.txt.gz",
        "valid.txt.gz",
    ]
    corpus = data.load_corpus("wikitext-103", target, download=False)
    assert corpus.vocab.itos == ["Sword", "play", "<eos>"] and corpus.valid.numel() == 3


def test_a_wrong_archive_member_is_rejected_and_the_archive_deleted(
    server, tmp_path, monkeypatch, capsys
):
    root, url = server
    texts = {"train": b"Sword PLAY\n", "valid": b"a b\n", "test": b"b a\n"}  # not the sha1
    _archive_corpus(root, url, texts, monkeypatch)
    target = tmp_path / "data"
    target.mkdir()  # the user's: kept; the corpus folder the fetch made goes with the failure
    assert main(["data", "fetch", "wikitext-103", "--to", str(target)]) == 2
    err = capsys.readouterr().err
    assert "wt.zip: sha1 mismatch: the download is not the expected wikitext-103/train" in err
    assert not (target / "wikitext-103").exists()  # no file, no part, no archive, no folder
    assert main(["data", "list", "--data", str(target)]) == 0
    out = capsys.readouterr().out
    assert "size unknown" in out and "(wt/wiki.train.tokens)" in out


def test_training_fetches_a_missing_corpus_or_says_how_to_provide_it(
    server, tmp_path, monkeypatch, capsys
):
    _, url = server
    monkeypatch.setenv("DROPSPLIT_MIRROR", url)
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()
    corpus = data.load_corpus("tinyshakespeare", tmp_path / "d", train_fraction=0.01)
    assert len(corpus.vocab) == 65
    assert "fetching it" in capsys.readouterr().err
    monkeypatch.setenv("DROPSPLIT_MIRROR", "http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match="three ways"):
        data.load_corpus("tinyshakespeare", tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="--no-download was given"):
        data.load_corpus("tinyshakespeare", tmp_path / "e", download=False)
