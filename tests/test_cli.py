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
