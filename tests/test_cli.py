import json

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
