import gzip
import os
from pathlib import Path

import pytest
import torch

from dropsplit import data

REAL = Path(os.environ.get("DROPSPLIT_DATA", Path(__file__).parents[2] / "shared" / "data"))
needs_real = pytest.mark.skipif(
    not (REAL / "ptb" / "train.txt.gz").is_file(),
    reason=f"real corpora not found at {REAL} (set DROPSPLIT_DATA)",
)


@needs_real
@pytest.mark.parametrize(
    "name, vocab, train",
    [
        ("ptb", 10_000, 929_589),
        ("ptb-char", 50, 5_017_482),
        ("wikitext-2", 33_278, 2_088_628),
        ("wikitext-2-char", 283, 10_719_952),
        ("tinyshakespeare", 65, None),
    ],
)
def test_real_corpora_have_the_published_counts(name, vocab, train):
    corpus = data.load_corpus(name, REAL)
    assert len(corpus.vocab) == vocab
    if train is not None:
        assert corpus.train.numel() == train


@needs_real
def test_ptb_valid_and_test_counts():
    corpus = data.load_corpus("ptb", REAL)
    assert (corpus.valid.numel(), corpus.test.numel()) == (73_760, 82_430)


@needs_real
@pytest.mark.parametrize("name", ["ptb", "wikitext-2"])
def test_the_character_reading_spells_out_the_word_stream(name):
    words, chars = data.load_corpus(name, REAL), data.load_corpus(f"{name}-char", REAL)
    for split in ("train", "valid", "test"):
        spelled = "".join(chars.vocab.itos[i] for i in getattr(chars, split).tolist())
        tokens = [words.vocab.itos[i] for i in getattr(words, split).tolist()]
        lines, line = [], []
        for token in tokens:  # WikiText-2 has empty lines: an <eos> alone is a bare newline
            if token == "<eos>":
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(token)
        assert spelled == "".join(lines)


def test_char_tokens_collapse_spaces_and_end_lines():
    assert data.char_tokens(" a  bc \n d\n") == ["a", " ", "b", "c", "\n", "d", "\n"]


def test_without_a_data_directory_the_user_cache_is_used(monkeypatch, tmp_path):
    monkeypatch.delenv("DROPSPLIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="three ways.*--data DIR.*DROPSPLIT_DATA"):
        data.load_corpus("ptb", download=False)
    assert (tmp_path / "dropsplit").is_dir()


def test_missing_file_is_explained(tmp_path):
    (tmp_path / "ptb").mkdir()
    with pytest.raises(FileNotFoundError, match="missing corpus file .*train.txt.gz"):
        data.load_corpus("ptb", tmp_path, download=False)


def test_a_given_directory_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_corpus("ptb", tmp_path / "nowhere")


def test_corrupt_file_is_detected(tmp_path):
    (tmp_path / "ptb").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "ptb" / f"{split}.txt.gz").write_bytes(gzip.compress(b" a b c \n"))
    with pytest.raises(ValueError, match="sha256"):
        data.load_corpus("ptb", tmp_path)
    (tmp_path / "ptb" / "train.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="corrupt"):
        data.load_corpus("ptb", tmp_path)


def test_synthetic_corpus_and_train_fraction_prefix():
    full = data.load_corpus("synthetic")
    part = data.load_corpus("synthetic", train_fraction=0.25)
    assert part.train.numel() == full.train.numel() // 4
    assert torch.equal(part.train, full.train[: part.train.numel()])
    assert torch.equal(part.valid, full.valid)
    with pytest.raises(ValueError, match="train_fraction"):
        data.load_corpus("synthetic", train_fraction=0.0)
    with pytest.raises(ValueError, match="corpus must be one of"):
        data.load_corpus("ptb2")


def test_word_tokens_add_eos_per_line():
    assert data.word_tokens(" a b \n c \n") == ["a", "b", "<eos>", "c", "<eos>"]


def test_batchify_shapes_and_order():
    ids = torch.arange(23)
    b = data.batchify(ids, 4)
    assert b.shape == (5, 4)
    assert torch.equal(b[:, 1], torch.arange(5, 10))
    with pytest.raises(ValueError, match="too few"):
        data.batchify(torch.arange(3), 4)


@pytest.mark.parametrize("variable", [False, True], ids=["fixed", "variable"])
def test_bptt_windows_cover_the_stream_and_are_deterministic(variable):
    stream = data.batchify(torch.arange(400), 4)

    def windows(seed, start=0):
        g = torch.Generator().manual_seed(seed)
        return list(data.bptt_batches(stream, 10, variable, g, start))

    a, b = windows(0), windows(0)
    assert [w[0] for w in a] == [w[0] for w in b]
    covered = torch.cat([w[1] for w in a])
    assert torch.equal(covered, stream[:-1])
    for _, x, y in a:
        assert torch.equal(x[1:], y[:-1]) and x.shape == y.shape
    if not variable:
        assert all(x.shape[0] == 10 for _, x, _ in a[:-1])


def test_variable_bptt_lengths_follow_awd():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([data.sequence_length(70, True, g) for _ in range(4000)]).double()
    assert lengths.min() >= 5
    assert 64 < lengths.mean() < 70  # N(70, 5), halved 5% of the time


@pytest.mark.parametrize(
    "payload, match",
    [(b"garbage", "Not a gzipped file"), (None, "end-of-stream")],
    ids=["not-gzip", "truncated-gzip"],
)
def test_corrupt_or_truncated_gzip_is_explained_with_the_fix(tmp_path, payload, match):
    (tmp_path / "tinyshakespeare").mkdir()
    target = tmp_path / "tinyshakespeare" / "input.txt.gz"
    target.write_bytes(payload or gzip.compress(os.urandom(10_000))[:100])
    with pytest.raises(ValueError, match=f"{match}.*dropsplit data fetch tinyshakespeare"):
        data.load_corpus("tinyshakespeare", tmp_path, download=False)
