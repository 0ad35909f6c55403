"""A newcomer's first hour (issue 31): dry runs leave nothing, measurements do not overwrite
silently, `data verify` tells "not fetched" from "corrupt", and the API reference lists every
module page."""

import gzip
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from dropsplit import fetch
from dropsplit.cli import main

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "synthetic-tiny.toml")
REAL = Path(os.environ.get("DROPSPLIT_DATA", ROOT.parent / "shared" / "data"))
SHAKESPEARE = REAL / "tinyshakespeare" / "input.txt.gz"
needs_real_data = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"real corpora not found at {REAL} (set DROPSPLIT_DATA)"
)


# --- train --dry-run ---------------------------------------------------------------------------


def test_a_dry_run_writes_nothing_that_lasts_and_reports_no_result(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "runs" / "tiny"
    assert main(["train", TINY, "--out", str(out), "--dry-run"]) == 0
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert list(scratch.glob("dropsplit-dry-run-*")) == []  # the temporary run directory is gone
    printed = capsys.readouterr().out
    assert "dry run OK" in printed and "no result is reported" in printed
    assert "ppl" not in printed and "perplexity" not in printed
    # the real run with the same --out is not blocked
    assert main(["train", TINY, "--out", str(out), "--set", "train.max_steps=2"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert "test ppl" in capsys.readouterr().out


def test_a_dry_run_refuses_resume(tmp_path, capsys):
    assert main(["train", TINY, "--out", str(tmp_path / "r"), "--dry-run", "--resume"]) == 2
    assert "--dry-run and --resume exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --- measure never overwrites silently ----------------------------------------------------------


@pytest.fixture
def fake_measure(monkeypatch):
    """``measure_run`` replaced by a stub writing a measure.json (the real one: test_inspect)."""
    from dropsplit.measure import effects
    from dropsplit.training import runs

    calls = []

    def measure_run(run, *, out=None, **kwargs):
        out = Path(out) if out else run / "measure"
        out.mkdir(parents=True, exist_ok=True)
        calls.append(out)
        (out / "measure.json").write_text(json.dumps({"call": len(calls)}))
        return {"call": len(calls)}, out, []

    monkeypatch.setattr(runs, "measure_run", measure_run)
    monkeypatch.setattr(effects, "format_effects", lambda result: "effects")
    return calls


@pytest.mark.parametrize("where", ["default", "--out"])
def test_a_second_measure_refuses_without_overwrite(tmp_path, fake_measure, capsys, where):
    run = tmp_path / "run"
    run.mkdir()
    extra = ["--out", str(tmp_path / "m")] if where == "--out" else []
    target = tmp_path / "m" if extra else run / "measure"
    assert main(["measure", str(run), *extra]) == 0
    capsys.readouterr()
    assert main(["measure", str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err == (
        f"dropsplit measure: error: {target} already holds a measurement (measure.json): "
        "pass --overwrite to replace it, or --out DIR to write beside it\n"
    )
    assert json.loads((target / "measure.json").read_text()) == {"call": 1}  # untouched
    assert main(["measure", str(run), *extra, "--overwrite"]) == 0
    assert json.loads((target / "measure.json").read_text()) == {"call": 2}
    assert len(fake_measure) == 2


# --- data verify ---------------------------------------------------------------------------------


def verify(*args):
    return main(["data", "verify", *map(str, args)])


@needs_real_data
def test_verify_lists_absent_corpora_as_not_fetched_and_succeeds(tmp_path, capsys):
    (tmp_path / "tinyshakespeare").mkdir()
    shutil.copy(SHAKESPEARE, tmp_path / "tinyshakespeare" / "input.txt.gz")
    assert verify(tmp_path) == 0
    out = capsys.readouterr().out
    assert "tinyshakespeare/input.txt.gz   ok" in out
    for name in ("ptb", "wikitext-2", "wikitext-103"):
        assert f"{name + '/':30} not fetched" in out
    assert out.endswith("verified: tinyshakespeare; not fetched: ptb, wikitext-2, wikitext-103\n")
    assert verify(tmp_path, "--require", "tinyshakespeare") == 0
    capsys.readouterr()
    # --require makes absence an error (exit 1, told apart from corrupt: exit 2), either order
    for args in ((tmp_path, "--require", "wikitext-103"), ("--require", "wikitext-103", tmp_path)):
        assert verify(*args) == 1
        err = capsys.readouterr().err
        assert err == (
            "dropsplit data: error: required but not fetched: wikitext-103 "
            f"(`dropsplit data fetch wikitext-103 --to {tmp_path}` fetches them)\n"
        )


@needs_real_data
def test_verify_fails_on_a_corrupt_or_incomplete_corpus(tmp_path, capsys):
    (tmp_path / "tinyshakespeare").mkdir()
    raw = bytearray(gzip.decompress(SHAKESPEARE.read_bytes()))
    raw[1000] ^= 1
    (tmp_path / "tinyshakespeare" / "input.txt.gz").write_bytes(gzip.compress(bytes(raw)))
    assert verify(tmp_path) == 2
    captured = capsys.readouterr()
    assert "tinyshakespeare/input.txt.gz   CORRUPT" in captured.out
    assert "corrupt or incomplete: tinyshakespeare" in captured.err
    # corrupt wins over a required corpus that is absent
    assert verify(tmp_path, "--require", "ptb") == 2
    assert "required but not fetched: ptb" in capsys.readouterr().err
    # a corpus with some of its files: incomplete, an error too
    shutil.rmtree(tmp_path / "tinyshakespeare")
    (tmp_path / "ptb").mkdir()
    shutil.copy(REAL / "ptb" / "valid.txt.gz", tmp_path / "ptb" / "valid.txt.gz")
    assert verify(tmp_path) == 2
    out = capsys.readouterr().out
    assert (
        "ptb/valid.txt.gz               ok" in out
        and "ptb/train.txt.gz               missing" in out
    )


def test_verify_of_the_default_cache_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DROPSPLIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert verify() == 0
    assert (
        "verified: no corpus; not fetched: ptb, wikitext-2, wikitext-103" in capsys.readouterr().out
    )
    assert not (tmp_path / "cache").exists()
    assert verify("--require", "ptb") == 1
    assert verify("--require", "nope") == 2
    assert "--require: unknown corpus 'nope' (names: ptb, " in capsys.readouterr().err


def test_verify_help_lists_the_corpus_names(capsys):
    with pytest.raises(SystemExit):
        main(["data", "verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in fetch.CORPUS_NAMES)
    assert "--require" in text and "not fetched" in text and "exit status" in text


# --- the API reference (built by .ci/run: `mkdocs build --strict`) -------------------------------

# the public API: every module of these is rendered on a page of docs/api/
API = ["core", "estimators", "measure", "models", "integrations", "methods", "baselines", "oracles"]


def api_modules():
    src = ROOT / "src" / "dropsplit"
    for name in API:
        if (src / f"{name}.py").is_file():
            yield f"dropsplit.{name}"
            continue
        for path in sorted((src / name).glob("*.py")):
            stem = path.stem
            yield f"dropsplit.{name}" if stem == "__init__" else f"dropsplit.{name}.{stem}"


def test_the_docs_config_lists_every_api_page_and_every_module():
    config = (ROOT / "mkdocs.yml").read_text()
    nav_pages = set(re.findall(r"^\s*- (?:[^:\n]+: )?(\S+\.(?:md|ipynb))\s*$", config, re.M))
    assert nav_pages, "mkdocs.yml has no nav"
    docs = ROOT / "docs"
    for page in nav_pages:
        assert (docs / page).exists(), f"mkdocs.yml lists {page}, which is not in docs/"
    api_pages = {f"api/{p.name}" for p in (docs / "api").glob("*.md")}
    assert api_pages - nav_pages == set(), "pages of docs/api/ missing from mkdocs.yml's nav"
    for concept in ("sites", "methods", "estimators", "measurements", "oracles", "models"):
        assert f"api/{concept}.md" in api_pages
    assert "api/integrations.md" in api_pages
    assert {"index.md", "paper-map.md", "tour.ipynb"} <= nav_pages
    rendered = set()
    for page in api_pages:
        rendered |= set(re.findall(r"^::: (dropsplit[\w.]*)\s*$", (docs / page).read_text(), re.M))
    missing = [m for m in api_modules() if m not in rendered]
    assert missing == [], f"modules no page of docs/api/ renders (`::: module`): {missing}"
