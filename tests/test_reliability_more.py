"""The last items of issue 30: windows past a Transformer's context (item 4), DDP rank files
tied to their checkpoint (item 8), one method on two models (item 9), safe and atomic reports,
huge paths and frozen models (item 16)."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_problem

import dropsplit as ds
from dropsplit.cli import main
from dropsplit.data import bptt_batches, sequence_length
from dropsplit.training import trainer as trainer_module
from dropsplit.training.config import load_config
from dropsplit.training.trainer import Trainer, train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "synthetic-tiny.toml"


def tiny(*overrides):
    return load_config(TINY, list(overrides))


def one_line(err):
    """The stderr of a CLI call: exactly one line, and short."""
    text = err.strip().splitlines()
    assert len(text) == 1, text
    assert len(text[0]) < 1000, len(text[0])
    return text[0]


# ---- item 4: variable windows past a Transformer's context ----------------------------------

# context 12 = bptt 12 passes the config check; N(12, 5) windows run past it on most epochs
SHORT_CONTEXT = (
    'model.name="transformer"',
    "model.context=12",
    "model.heads=2",
    "data.variable_bptt=true",
    "train.eval_every=3",
    "train.checkpoint_every=3",
)


def test_window_lengths_are_clipped_without_changing_the_draws():
    data = torch.arange(400).view(200, 2)

    def lengths(**kwargs):
        windows = bptt_batches(data, 12, True, torch.Generator().manual_seed(5), **kwargs)
        return [x.shape[0] for _, x, _ in windows]

    free, clipped = lengths(), lengths(max_length=12)
    assert max(free) > 12  # the draws that used to end the run
    assert max(clipped) <= 12
    # the same draws, each cut at the context: the generator moves as before
    generator = torch.Generator().manual_seed(5)
    expected = []
    i = 0
    while i < 199:
        length = min(sequence_length(12, True, generator), 12, 199 - i)
        expected.append(length)
        i += length
    assert clipped == expected


def test_windows_past_the_context_are_clipped_and_the_run_resumes_exactly(tmp_path):
    config = tiny("train.max_steps=6", "model.layers=1", *SHORT_CONTEXT)
    # the run's own draws (its window generator is seeded train.seed + 1) run past the context
    generator = torch.Generator().manual_seed(config.train.seed + 1)
    assert max(sequence_length(12, True, generator) for _ in range(6)) > 12
    whole = train(config, tmp_path / "whole", show_progress=False)
    assert whole["steps"] == 6
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "cut", interrupt_at_step=3, show_progress=False)
    resumed = train(config, tmp_path / "cut", resume=True, show_progress=False)
    assert resumed["best_val_loss"] == whole["best_val_loss"]
    assert resumed["test_loss"] == whole["test_loss"]


# ---- item 8: DDP rank files tied to their checkpoint -----------------------------------------


EIGHT = ("train.max_steps=8", "train.checkpoint_every=2")


def _two_processes(monkeypatch, rank):
    """The trainer as rank ``rank`` of two, without a process group (DDP's wrapper a no-op)."""
    monkeypatch.setattr(trainer_module, "distributed", lambda: (rank, 2))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model: model)


def test_rank_files_record_the_step_of_their_checkpoint(tmp_path):
    trainer = Trainer(tiny("train.max_steps=2"), tmp_path / "r", show_progress=False)
    try:
        trainer.progress.step = 7
        trainer.rank = 1
        trainer.checkpoint()
    finally:
        trainer.close()
    own = torch.load(tmp_path / "r" / "rank1.pt", weights_only=True)
    assert own["step"] == 7


def _run_of_two(tmp_path, monkeypatch, rank_step):
    """A run checkpointed at step 4 as if by two processes, its rank1.pt at ``rank_step``."""
    run = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(*EIGHT), run, interrupt_at_step=4, show_progress=False)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 4
    ckpt["world"] = 2
    torch.save(ckpt, run / "checkpoint.pt")
    own = {"method": ckpt["method"], "state": ckpt["state"]}
    if rank_step is not None:
        own["step"] = rank_step
    torch.save(own, run / "rank1.pt")
    return run


@pytest.mark.parametrize("rank", [0, 1], ids=["rank0", "rank1"])
def test_a_stale_rank_file_is_refused_at_resume(tmp_path, monkeypatch, rank):
    run = _run_of_two(tmp_path, monkeypatch, rank_step=2)
    _two_processes(monkeypatch, rank)
    with pytest.raises(ValueError) as err:
        Trainer(tiny(*EIGHT), run, resume=True, show_progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"{run / 'rank1.pt'} is from step 2, {run / 'checkpoint.pt'} from step 4" in message
    assert "--overwrite" in message


@pytest.mark.parametrize("rank_step", [4, None], ids=["same-step", "older-file-without-step"])
def test_a_rank_file_of_the_checkpoint_step_resumes(tmp_path, monkeypatch, rank_step):
    run = _run_of_two(tmp_path, monkeypatch, rank_step)
    _two_processes(monkeypatch, 1)
    trainer = Trainer(tiny(*EIGHT), run, resume=True, show_progress=False)
    trainer.close()
    assert trainer.progress.step == 4


def test_a_missing_rank_file_is_one_line(tmp_path, monkeypatch):
    run = _run_of_two(tmp_path, monkeypatch, rank_step=4)
    (run / "rank1.pt").unlink()
    _two_processes(monkeypatch, 0)
    with pytest.raises(FileNotFoundError, match=r"rank1.pt does not exist: .*--overwrite"):
        Trainer(tiny(*EIGHT), run, resume=True, show_progress=False)


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path, monkeypatch):
    run = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(*EIGHT), run, interrupt_at_step=4, show_progress=False)
    _two_processes(monkeypatch, 0)
    with pytest.raises(ValueError, match=r"checkpoint.pt was written by 1 process, not 2: resume"):
        Trainer(tiny(*EIGHT), run, resume=True, show_progress=False)


# ---- item 9: one method object on two models --------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ds.Analytic("label", False, explicit_every=2, seed=0),
        lambda: ds.Analytic("label", False, start_step=1, seed=0),
    ],
    ids=["explicit_every", "start_step"],
)
def test_one_method_on_two_models_counts_the_steps_of_each(make):
    method = make()
    a, b = make_problem("mlp-two-sites"), make_problem("mlp-two-sites")
    alone = make()
    expected = []
    for _ in range(3):
        expected.append("explicit" in alone.step(a.model, a.forward_fn, a.batch).stats)
    got_a, got_b = [], []
    for _ in range(3):  # interleaved: each model sees its own schedule
        got_a.append("explicit" in method.step(a.model, a.forward_fn, a.batch).stats)
        got_b.append("explicit" in method.step(b.model, b.forward_fn, b.batch).stats)
    assert got_a == expected and got_b == expected


def test_the_step_count_of_two_models_is_not_one_state():
    method = ds.Analytic("label", False, explicit_every=2, seed=0)
    a, b = make_problem("mlp-two-sites"), make_problem("mlp-two-sites")
    method.step(a.model, a.forward_fn, a.batch)
    assert int(method.state_dict()["steps"]) == 1  # one model: its count, as before
    method.step(b.model, b.forward_fn, b.batch)
    with pytest.raises(ValueError, match="stepped 2 models: its state holds one step count"):
        method.state_dict()
    method.load_state_dict({"generator": method.generator.get_state(), "steps": torch.tensor(5)})
    assert method.steps == 5  # a loaded count is the one the next model starts from


# ---- item 16: every parameter frozen ------------------------------------------------------------

METHODS = {
    "none": lambda: ds.NoDropout(),
    "dropout-2": lambda: ds.DropoutK(2, seed=0),
    "difference": lambda: ds.DropoutK(2, "difference", seed=0),
    "analytic": lambda: ds.Analytic(seed=0),
    "finite-difference": lambda: ds.Analytic("label", gradient="finite-difference", seed=0),
    "hvp-difference": lambda: ds.Analytic("label", gradient="hvp-difference", seed=0),
    "rdrop": lambda: ds.RDrop(0.5, seed=0),
    "fraternal": lambda: ds.Fraternal(0.25, seed=0),
}


@pytest.mark.parametrize("name", METHODS)
def test_every_parameter_frozen_is_a_clear_error(name):
    pb = make_problem("mlp-two-sites")
    for p in pb.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires a gradient"):
        METHODS[name]().step(pb.model, pb.forward_fn, pb.batch)


# ---- item 16: a 10 MB path is one line with a shortened echo ------------------------------------

HUGE = "x" * 10_000_000


@pytest.mark.parametrize(
    "argv",
    [
        ["train", HUGE],
        ["train", str(TINY), "--out", HUGE, "--set", "train.max_steps=2"],
        ["eval", HUGE],
        ["measure", HUGE],
        ["report", HUGE, "--out", "REPORT"],
        ["data", "verify", HUGE],
    ],
    ids=["train-config", "train-out", "eval", "measure", "report", "data-verify"],
)
def test_a_huge_path_is_one_line_with_a_shortened_echo(tmp_path, capsys, argv):
    argv = [str(tmp_path / "report") if a == "REPORT" else a for a in argv]
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert re.search(r"x\.\.\.x+\S* \(10,000,0\d\d characters\)", line), line


# ---- reports: names, missing values, read-only directories, atomic files ---------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of a suite (run.json beside the run's files), copied by each test."""
    run = tmp_path_factory.mktemp("suite") / "a" / "seed0"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        train(tiny("train.max_steps=4", "train.eval_every=2"), run, show_progress=False)
    finally:
        torch.set_default_dtype(previous)
    spec = {"name": "a", "group": "dropout-k", "seed": 0, "label": "a", "overrides": []}
    (run / "run.json").write_text(json.dumps(spec))
    return run


def _copy(finished_run, tmp_path):
    run = tmp_path / "runs" / "a" / "seed0"
    shutil.copytree(finished_run, run)
    return run


@pytest.mark.parametrize(
    "name", ["../../escaped", "/tmp/absolute", "..", "a/b"], ids=["up", "absolute", "dots", "slash"]
)
def test_report_refuses_run_names_outside_its_directory(finished_run, tmp_path, capsys, name):
    run = _copy(finished_run, tmp_path)
    spec = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**spec, "name": name}))
    assert main(["report", str(run), "--out", str(tmp_path / "o" / "p")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "run.json: run name" in line and "must be letters, digits" in line
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "o" / "p" / "runs").exists()


@pytest.mark.parametrize(
    "damage, match",
    [
        ("no-test-ppl", r"summary.json has no test_ppl"),
        ("summary-not-json", r"summary.json is not JSON"),
        ("empty-metrics", r"metrics.jsonl holds no evaluation"),
        ("metrics-not-json", r"metrics.jsonl line 3 is not JSON"),
        ("run-json-no-seed", r"run.json has no seed"),
    ],
    ids=["no-test-ppl", "summary-not-json", "empty-metrics", "metrics-not-json", "no-seed"],
)
def test_report_on_an_incomplete_run_is_one_line(finished_run, tmp_path, capsys, damage, match):
    run = _copy(finished_run, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    if damage == "no-test-ppl":
        del summary["test_ppl"]
        (run / "summary.json").write_text(json.dumps(summary))
    elif damage == "summary-not-json":
        (run / "summary.json").write_text('{"best_val_ppl": 3')
    elif damage == "empty-metrics":
        (run / "metrics.jsonl").write_text("")
    elif damage == "metrics-not-json":
        (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "{torn\n")
    else:
        spec = json.loads((run / "run.json").read_text())
        del spec["seed"]
        (run / "run.json").write_text(json.dumps(spec))
    assert main(["report", str(run), "--out", str(tmp_path / "o")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("dropsplit report: error: ")
    assert re.search(match, line), line


def test_reproduce_leaves_an_incomplete_run_out_of_its_report(finished_run, tmp_path):
    from dropsplit.experiments.reproduce import unreportable

    run = _copy(finished_run, tmp_path)
    assert unreportable(run) is None
    (run / "metrics.jsonl").write_text("")
    assert "metrics.jsonl holds no evaluation" in unreportable(run)


def test_report_into_a_read_only_directory_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    run = _copy(finished_run, tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode)
    )
    assert main(["report", str(run), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"cannot write the report to {out}: the directory is read-only" in line
    assert list(out.iterdir()) == []


def test_report_files_are_written_atomically(finished_run, tmp_path, monkeypatch):
    run = _copy(finished_run, tmp_path)
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append(Path(b).name) or real(a, b))
    assert main(["report", str(run), "--out", str(tmp_path / "o")]) == 0
    for name in ("REPORT.md", "summary.csv", "run.json", "summary.json", "metrics.jsonl"):
        assert name in replaced, name
    pngs = sorted(p.name for p in (tmp_path / "o").glob("*.png"))
    assert pngs and all(name in replaced for name in pngs)
    leftovers = [p for p in (tmp_path / "o").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_huge_value_in_a_usage_error_is_shortened(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "fetch", HUGE])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err) < 2000 and "10,000,000 characters" in err


@pytest.mark.parametrize(
    "content", ["{not json", '{"rows": [1]}', "[]"], ids=["torn", "list", "no-rows"]
)
def test_report_with_a_bad_step_costs_file_is_one_line(finished_run, tmp_path, capsys, content):
    run = _copy(finished_run, tmp_path)
    (tmp_path / "bench.json").write_text(content)
    argv = ["report", str(run), "--out", str(tmp_path / "o"), "--step-costs"]
    assert main([*argv, str(tmp_path / "bench.json")]) == 2
    assert "is not a `dropsplit bench --json` file" in one_line(capsys.readouterr().err)
