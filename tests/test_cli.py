import json
from pathlib import Path

import pytest

from dropsplit.cli import main


def test_demo_runs_and_writes_consistent_numbers(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--steps", "30", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Explicit effect per site" in text and "weight_hh" in text
    numbers = json.loads(out.read_text())
    assert set(numbers["sites"]) == {"input", "weight_hh", "output"}
    out_site = numbers["sites"]["output"]
    # before a linear head the Gauss-Newton prediction is the second-order term itself
    assert abs(out_site["gap"] - out_site["exact/mask"]) < 0.25 * out_site["exact/mask"]
    assert numbers["noise_trace"]["difference"] > 0


def test_a_missing_optional_dependency_is_one_line(monkeypatch, tmp_path, capsys):
    """Without matplotlib, reproduce stops before training and names the package to install."""
    import sys

    from dropsplit.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["reproduce", "--out", str(tmp_path / "r"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib: pip install 'dropsplit[cli]'" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "-5"], "--steps must be at least 1"),
        (["train", "nowhere.toml"], "config file nowhere.toml does not exist"),
        (["train", "BROKEN"], "is not valid TOML"),
        (["train", "configs/synthetic-tiny.toml", "--set", "lr"], "section.key=value"),
        (["eval", "."], "checkpoint"),
    ],
    ids=["demo-steps", "missing-config", "toml-syntax", "set-without-equals", "eval-not-a-run"],
)
def test_bad_input_is_one_line_with_exit_code_2(argv, message, tmp_path, capsys, monkeypatch):
    from dropsplit.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    if "BROKEN" in argv:
        broken = tmp_path / "broken.toml"
        broken.write_text("[data\ncorpus = 1\n")
        argv = [str(broken) if a == "BROKEN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_version(capsys):
    from dropsplit.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and "dropsplit 0.1.0" in capsys.readouterr().out


def test_convert_keeps_eval_mode():
    import torch

    import dropsplit as ds

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).eval()
    converted = ds.convert(model)
    assert not converted[1].training
    x = torch.randn(4, 3)
    assert torch.equal(converted(x), converted(x))  # no dropout in eval


def test_every_option_has_help():
    import argparse

    from dropsplit.cli import build_parser

    missing = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")
            elif action.help is None:
                missing.append(f"{prefix} {action.option_strings or action.dest}")

    walk(build_parser(), "dropsplit")
    assert not missing


@pytest.mark.parametrize(
    "argv", [["nope"], ["train", "--bogus"], ["data", "fetch", "mnist"]], ids=str
)
def test_unknown_subcommands_options_and_corpora_exit_2_with_a_usage_line(argv, capsys):
    from dropsplit.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "error:" in err and "Traceback" not in err
