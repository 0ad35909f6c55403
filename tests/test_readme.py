"""The README as a new user meets it: every code block runs as written, the help of every
command and option is there, and a relative data directory means the same thing to the tour
notebook as to the shell it was started from.

Code blocks: every ```python block runs in a fresh interpreter in a scratch directory. A block
preceded by an HTML comment is handled by it:

* ``<!-- requires: timm -->``, ``<!-- requires: transformers, accelerate -->``,
  ``<!-- requires: cuda -->``: skipped, with that reason, where one of those libraries (optional
  extras: ``[integrations]``, ``[lightning]``) does not import or no CUDA device is present; the
  block must use what it names;
* ``<!-- not run by the tests: why -->``: skipped with that reason (installs, long runs, the
  test suite itself); every other ```bash block runs with bash in the repository root;
* ``<!-- output of the block above -->`` on a ```text block: what the python block before it
  prints, each number within two units of its last printed digit.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dropsplit.cli import build_parser
from dropsplit.fetch import CORPUS_NAMES

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
TIMEOUT = 600  # seconds a block may run (the Trainer and Lightning blocks take tens of seconds)

FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(?P<kind>requires|not run by the tests|output of the block above)"
                    r"\s*:?\s*(?P<arg>.*?)\s*-->")  # fmt: skip
TIMINGS = "| step | idle | under a competing load |"  # the head of the README's timing table
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence
    kind: str | None  # the marker on the line before, if any
    arg: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang or 'plain'}"


@functools.cache
def blocks() -> tuple[Block, ...]:
    text = README.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = MARKER.fullmatch(before)
        found.append(
            Block(
                lang=m["lang"],
                code=m["code"],
                line=text.count("\n", 0, m.start()) + 1,
                kind=marker["kind"] if marker else None,
                arg=marker["arg"] if marker else "",
            )
        )
    return tuple(found)


def expected_output(block: Block) -> Block | None:
    """The ``text`` block marked as the output of ``block``, if the next block is one."""
    following = [b for b in blocks() if b.line > block.line]
    if following and following[0].kind == "output of the block above":
        return following[0]
    return None


def requirements(block: Block) -> list[str]:
    return [name.strip() for name in block.arg.split(",")] if block.kind == "requires" else []


@functools.cache
def imports(library: str) -> tuple[bool, str]:
    """Whether ``library`` imports here, and if not the error's last line (tried in a child:
    a failed import, timm's through torchvision, can leave modules half-loaded)."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {library}"], capture_output=True, text=True, timeout=300
    )
    return done.returncode == 0, (done.stderr.strip().splitlines() or ["?"])[-1]


def skip_unless_available(block: Block) -> None:
    for need in requirements(block):
        if need == "cuda":
            if not torch.cuda.is_available():
                pytest.skip("requires cuda: no CUDA device here")
            continue
        assert re.fullmatch(r"[A-Za-z_]\w*", need), f"README line {block.line}: {need!r}"
        ok, why = imports(need)
        if not ok:
            pytest.skip(f"requires {need}, which does not import here ({why})")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


# --- the blocks --------------------------------------------------------------------------------


def test_every_block_is_python_bash_or_a_marked_output():
    assert blocks(), "README.md has no code blocks"
    for block in blocks():
        where = f"README line {block.line}"
        assert block.lang in ("python", "bash", "text"), f"{where}: a ```{block.lang} block"
        if block.lang == "text":
            assert block.kind == "output of the block above", f"{where}: text that is no output"
            previous = [b for b in blocks() if b.line < block.line][-1]
            assert previous.lang == "python", f"{where}: the output of a {previous.lang} block"
        if block.kind == "not run by the tests":
            assert block.lang == "bash", f"{where}: every python block runs"
            assert block.arg, f"{where}: say why it is not run"


def test_requirement_markers_are_honest():
    """A block marked as needing libraries imports one of them; one needing CUDA uses it."""
    for block in blocks():
        needs = requirements(block)
        if not needs:
            continue
        assert block.lang == "python", block.id
        if "cuda" in needs:
            assert "cuda" in block.code, block.id
        libraries = [n for n in needs if n != "cuda"]
        if libraries:
            imported = set(re.findall(r"^from (\w+)", block.code, re.M))
            for line in re.findall(r"^import (.*)$", block.code, re.M):  # import a, b as c
                imported |= set(re.findall(r"\w+", line.split("#")[0]))
            assert imported & set(libraries), f"{block.id} imports none of {libraries}"


def python_blocks():
    return [pytest.param(b, id=b.id) for b in blocks() if b.lang == "python"]


def bash_blocks():
    return [pytest.param(b, id=b.id) for b in blocks() if b.lang == "bash"]


@pytest.mark.parametrize("block", python_blocks())
def test_python_block_runs_as_written(block, tmp_path):
    skip_unless_available(block)
    script = tmp_path / "block.py"
    script.write_text(block.code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"README line {block.line}:\n{done.stderr[-4000:]}"
    output = expected_output(block)
    if output is not None:
        assert_same_output(done.stdout, output.code, output.line)


def assert_same_output(got: str, want: str, line: int) -> None:
    """Equal text; numbers equal within two units of the last digit the README shows."""
    assert NUMBER.sub("#", got).strip() == NUMBER.sub("#", want).strip(), (
        f"README line {line}: the output changed:\n{got}"
    )
    for g, w in zip(NUMBER.findall(got), NUMBER.findall(want), strict=True):
        decimals = len(w.split(".")[1].split("e")[0]) if "." in w else 0
        assert abs(float(g) - float(w)) <= 2 * 10.0**-decimals + 1e-12, (
            f"README line {line}: {g} printed, the README shows {w}:\n{got}"
        )


@pytest.mark.parametrize("block", bash_blocks())
def test_bash_block_runs_as_written(block):
    if block.kind == "not run by the tests":
        pytest.skip(f"README marks it: {block.arg}")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"README line {block.line}:\n{done.stderr[-4000:]}"


def test_the_readme_links_only_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def timing_table(text: str) -> str:
    """The README's timing table: its head, rule and rows."""
    start = text.index(TIMINGS)
    return text[start : text.index("\n\n", start)]


def test_the_readme_has_two_commands_and_no_development_history():
    text = README.read_text()
    two = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert len(FENCE.findall(two)) == 2, "'Two commands' shows a number of blocks other than 2"
    # a date belongs to a measurement (the timing table), not to the README's history
    text = text.replace(timing_table(text), "")
    for word in (r"\bsession", r"\bearlier\b", r"\bwe changed\b", r"\b20\d\d-\d\d"):
        assert not re.search(word, text, re.I), f"README: {word}"


def test_plot_effects_creates_its_directory(tmp_path):
    pytest.importorskip("matplotlib")
    import dropsplit as ds
    from dropsplit.measure import measure_effects, plot_effects

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), ds.Dropout(0.2, label="hidden"),
        torch.nn.Linear(8, 3),
    ).train()  # fmt: skip
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    result = measure_effects(
        model, lambda m, b: (m(b[0]), b[1]), [batch, batch], gap_samples=8, noise_samples=8
    )
    out = tmp_path / "not" / "yet" / "there"
    paths = plot_effects(result, out)
    assert [Path(p).name for p in paths] == ["gap_vs_prediction.png", "noise_spectra.png"]
    assert all(Path(p).is_file() and Path(p).parent == out for p in paths)
    plot_effects(result, out)  # again, into the directory that now exists


# --- help texts --------------------------------------------------------------------------------


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    """(command path, option or subcommand, its help) for every action under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield path, name, helps.get(name)
                yield from walk(sub, (*path, name))
        elif action.help is not argparse.SUPPRESS:  # hidden on purpose (bench --memory-of)
            yield path, "/".join(action.option_strings) or action.dest, action.help


def bench_parser(monkeypatch) -> argparse.ArgumentParser:
    """The parser ``dropsplit bench`` builds (inside its main), caught as it parses."""
    from dropsplit.experiments import benchmark

    class Caught(Exception):
        pass

    caught: list[argparse.ArgumentParser] = []

    def parse_args(self, args=None, namespace=None):
        caught.append(self)
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(Caught):
        benchmark.main([])
    return caught[0]


def test_every_subcommand_and_option_has_help(monkeypatch):
    items = list(walk(build_parser(), ("dropsplit",)))
    items += walk(bench_parser(monkeypatch), ("dropsplit", "bench"))
    commands = {name for path, name, _ in items if len(path) == 1}
    assert {"demo", "train", "reproduce", "report", "matrix", "bench", "data", "eval"} <= commands
    missing = [" ".join((*path, name)) for path, name, text in items if not (text or "").strip()]
    assert missing == [], f"no help: {missing}"


def help_text(capsys, *argv: str) -> str:
    """``dropsplit ARGV --help``, its whitespace folded."""
    from dropsplit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_data_fetch_help_lists_the_corpus_names(capsys):
    text = help_text(capsys, "data", "fetch")
    assert all(name in text for name in CORPUS_NAMES), text


def test_help_texts_are_current(capsys):
    top = help_text(capsys)
    assert "AWD-style LM" not in top
    assert all(name in top for name in ("LSTM", "QRNN", "Transformer"))
    text = help_text(capsys, "reproduce")
    assert "15 min" not in text and "AMD EPYC" in text


# --- the tour notebook's data directory ----------------------------------------------------------

NOTEBOOK = ROOT / "notebooks" / "tour.ipynb"


def data_cell() -> str:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return next(c for c in code if "DROPSPLIT_DATA" in c)


def run_cell(code: str, *, data: str, pwd: Path) -> str:
    """``code`` run as the notebook's kernel runs it: in notebooks/, with the shell's $PWD."""
    env = child_env() | {"DROPSPLIT_DATA": data, "PWD": str(pwd)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=NOTEBOOK.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_a_relative_data_directory_counts_from_where_the_command_ran(tmp_path):
    """Relative to $PWD (where pytest or jupyter was started), not to notebooks/."""
    (tmp_path / "corpora").mkdir()
    cell = data_cell()
    resolving = cell.split("corpus = load_corpus(", 1)[0] + "print(DATA, CORPUS)\n"
    out = run_cell(resolving, data="corpora", pwd=tmp_path)
    assert out.split() == [str(tmp_path / "corpora"), "ptb"]
    out = run_cell(resolving, data="absent", pwd=tmp_path)
    assert out.splitlines()[-1].split() == [str(tmp_path / "absent"), "synthetic"]


REAL = Path(os.environ.get("DROPSPLIT_DATA", ROOT.parent / "shared" / "data")).resolve()


@pytest.mark.skipif(not (REAL / "ptb").is_dir(), reason=f"PTB not found in {REAL}")
def test_the_tour_uses_the_real_corpus_given_relative_to_the_repository():
    """As `DROPSPLIT_DATA=../shared/data python -m pytest` from the repository root runs it."""
    out = run_cell(data_cell(), data=os.path.relpath(REAL, ROOT), pwd=ROOT)
    assert "corpus: ptb" in out, out


def test_every_time_the_readme_gives_is_a_dated_range_idle_and_loaded():
    """Issue 31.6: the timing table gives, per step, an idle time and a time under a competing
    load, each with its date (and the load named); the text names the machine and the thread
    setting."""
    text = README.read_text()
    start = text.index(TIMINGS)
    table = timing_table(text).splitlines()[2:]
    assert len(table) >= 4, "install, main job, tests, .ci/run"
    timed = re.compile(r"\d+(?:\.\d+)? (?:s|min) \((?:CI, )?\d{4}-\d\d-\d\d")
    for row in table:
        idle, loaded = (cell.strip() for cell in row.split("|")[2:4])
        assert timed.search(idle) and timed.search(loaded), row
        assert "beside" in loaded, f"the load is not named: {row}"
    intro = text[text.rindex("\n\n", 0, start - 2) : start]
    assert "AMD EPYC" in intro and "thread" in intro
