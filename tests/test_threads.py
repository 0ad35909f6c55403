"""The thread policy: the rule, its overrides, and that train / eval record what they used."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dropsplit.cli import main
from dropsplit.training import threads
from dropsplit.training.config import load_config
from dropsplit.training.threads import default_threads, set_threads, share_cores

TINY = Path(__file__).parents[1] / "configs" / "synthetic-tiny.toml"


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """Each test leaves the process's thread count and core share as it found them."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)
    share_cores(1)


@pytest.mark.parametrize(
    "parameters, cores, jobs, expected",
    [
        (10_000, 2, 1, 1),
        (threads.LARGE_MODEL - 1, 16, 1, 1),
        (threads.LARGE_MODEL, 2, 1, 2),
        (threads.LARGE_MODEL, 16, 4, 4),
        (threads.LARGE_MODEL, 2, 4, 1),
    ],
    ids=["small", "just-small", "large-2-cores", "large-16-cores-4-jobs", "more-jobs-than-cores"],
)
def test_rule(parameters, cores, jobs, expected):
    assert default_threads(parameters, cores, jobs) == expected


def _model(parameters: int) -> nn.Module:
    return nn.Linear(parameters - 1, 1)  # parameters - 1 weights and one bias


@pytest.mark.parametrize("requested", [1, 2, 3])
def test_a_requested_count_is_set(requested):
    assert set_threads(requested, _model(10)) == requested
    assert torch.get_num_threads() == requested


def test_the_rule_sets_one_thread_for_a_small_model():
    torch.set_num_threads(2)
    assert set_threads(0, _model(10)) == 1
    assert torch.get_num_threads() == 1


def test_a_large_model_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "LARGE_MODEL", 10)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    assert set_threads(0, _model(10)) == 4
    share_cores(2)
    assert set_threads(0, _model(10)) == 2


def test_omp_num_threads_set_by_the_user_is_kept(monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(0, _model(10)) == 2
    assert torch.get_num_threads() == 2
    assert set_threads(1, _model(10)) == 1  # an explicit count still wins


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True], ids=repr)
def test_share_cores_refuses_a_bad_count(jobs):
    with pytest.raises(ValueError, match="jobs must be a positive int"):
        share_cores(jobs)


def test_train_records_the_threads_of_the_flag_and_of_the_rule(tmp_path, capsys):
    torch.set_num_threads(2)
    args = ["train", str(TINY), "--set", "train.eval_every=2", "--set", "train.max_steps=2"]
    assert main([*args, "--out", str(tmp_path / "ruled")]) == 0
    assert json.loads((tmp_path / "ruled" / "summary.json").read_text())["threads"] == 1
    assert main([*args, "--out", str(tmp_path / "flag"), "--threads", "2"]) == 0
    summary = json.loads((tmp_path / "flag" / "summary.json").read_text())
    assert summary["threads"] == 2
    assert load_config(tmp_path / "flag" / "config.toml").train.threads == 2
    # the thread count is the speed, not the run: a resume may change it
    more = [*args[:-2], "--set", "train.max_steps=3", "--resume", "--threads", "1"]
    assert main([*more, "--out", str(tmp_path / "flag")]) == 0


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_the_flag_refuses_a_count_below_one(bad, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "somewhere", "--threads", bad])
    assert "--threads: must be a positive integer" in capsys.readouterr().err


def test_the_config_key_refuses_a_negative_count():
    with pytest.raises(ValueError, match="train.threads must be >= 0"):
        load_config(TINY, ["train.threads=-1"])
