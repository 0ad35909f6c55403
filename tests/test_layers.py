"""The package's layers import only downward: every module's dropsplit imports, read from source."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dropsplit"

# lowest first; a module may import its own layer and the layers before it
LAYERS = [
    ["core.noise", "core.unsited", "core.buffers", "optional"],
    ["core.sites"],
    ["core.losses"],
    ["core.forward"],
    ["core.explicit", "core.implicit"],
    ["integrations"],
    ["estimators"],
    ["methods"],
    ["baselines"],
    # the training-loop integrations drive methods, so they sit above them
    ["integrations.hf_trainer", "integrations.lightning"],
    ["measure", "oracles"],
    ["models"],
    ["data", "fetch"],
    ["training"],
    ["experiments"],
    ["cli", "__main__", "__init__"],
]


def layer_of(module: str) -> int:
    """Index of the layer of ``module`` (dotted, relative to the package): the longest prefix."""
    matches = [
        (len(p), index)
        for index, prefixes in enumerate(LAYERS)
        for p in prefixes
        if module == p or module.startswith(p + ".")
    ]
    if matches:
        return max(matches)[1]
    if module == "core":
        return 0
    raise AssertionError(f"module dropsplit.{module} belongs to no layer: add it to LAYERS")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(path: Path) -> list[str]:
    """Every ``dropsplit.X`` a module imports, at any depth (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module == "dropsplit":  # from dropsplit import oracles
                names = [f"dropsplit.{a.name}" for a in node.names]
        found += [n.removeprefix("dropsplit.") for n in names if n.startswith("dropsplit.")]
    return found


@pytest.mark.parametrize("module, path", list(modules()), ids=lambda v: str(v))
def test_imports_only_downward(module, path):
    own = layer_of(module)
    upward = [m for m in imports(path) if layer_of(m) > own]
    assert not upward, f"dropsplit.{module} imports from a higher layer: {upward}"


def test_oracles_never_import_estimators_or_methods():
    found = imports(PACKAGE / "oracles.py")
    assert not [m for m in found if m.startswith(("estimators", "methods"))]


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dropsplit.training.trainer import train\n")
    assert layer_of(imports(bad)[0]) > layer_of("core.sites")
