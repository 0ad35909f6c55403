"""Saved configs for the suites' run names, as the tests of the claims and reports need them.

The claims select runs by their saved config, not their names: a synthetic run called
``explicit`` must carry the config of an explicit-only analytic run.
"""

import json
import re

from dropsplit.training.config import load_config, to_dict

# the character-level suites' base, in the keys the claims read
BASE = [
    'data.corpus="ptb-char"',
    "data.train_fraction=0.005",
    'method.gradient="hvp-difference"',
    "train.epochs=10",
]


def _set(**values):
    return [f"{key.replace('__', '.')}={json.dumps(v)}" for key, v in values.items()]


def overrides_for(name):
    """``--set`` overrides that make a run of the suites' ``name``."""
    for pattern, prefix in (
        (r"data-([0-9.]+)-(.+)", lambda m: _set(data__train_fraction=float(m[1]))),
        (r"q([0-9.]+)-(.+)", lambda m: _set(model__p_input=float(m[1]), model__p_hidden=0.2)),
        (r"e([0-9]+)-(.+)", lambda m: _set(train__epochs=int(m[1]))),
    ):
        match = re.fullmatch(pattern, name)
        if match:
            return prefix(match) + overrides_for(match[2])
    analytic = _set(method__name="analytic")
    explicit = analytic + _set(method__implicit=False)
    fixed = {
        "no-dropout": _set(method__name="none"),
        "analytic": analytic,
        "explicit": explicit,
        "analytic-exact": analytic + _set(method__gradient="double-backward"),
        "analytic-fd": analytic + _set(method__gradient="finite-difference"),
        "explicit-fd": explicit + _set(method__gradient="finite-difference"),
        "analytic-element": analytic + _set(method__grouping="element"),
        "explicit-element": explicit + _set(method__grouping="element"),
    }
    if name in fixed:
        return fixed[name]
    match = re.fullmatch(r"dropout-(\d+)(?:-(difference|analytic))?", name)
    if match:
        return _set(method__k=int(match[1]), method__noise=match[2] or "none")
    match = re.fullmatch(r"(identity|label)-x([0-9.]+)", name)
    if match:
        return explicit + _set(method__curvature=match[1], method__explicit_scale=float(match[2]))
    match = re.fullmatch(r"l2-(adamw-)?([0-9.e-]+)", name)
    if match:
        optimizer = _set(optim__name="adamw") if match[1] else []
        return _set(method__name="none", optim__weight_decay=float(match[2])) + optimizer
    match = re.fullmatch(r"(rdrop|fraternal)-([0-9.]+)", name)
    if match:
        strength = "method.alpha" if match[1] == "rdrop" else "method.kappa"
        return _set(method__name=match[1]) + [f"{strength}={float(match[2])}"]
    raise ValueError(f"no config for a run named {name}")


def config_for(name, *extra):
    """The saved config (``summary.json``'s ``config``) of a run of the suites' ``name``."""
    return to_dict(load_config(None, [*BASE, *overrides_for(name), *extra]))
