"""The trainer trains any task: the registry, new tasks, exact resume, carried state, configs."""

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dropsplit.cli import main
from dropsplit.training import runs
from dropsplit.training.checkpoint import flatten_state
from dropsplit.training.config import check_resumable, load_config, to_toml
from dropsplit.training.tasks import TASKS, pack_state, task_class, unpack_state
from dropsplit.training.trainer import train

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "src" / "dropsplit" / "configs"
TINY = CONFIGS / "synthetic-tiny.toml"
DIGITS = CONFIGS / "digits-mlp.toml"
HF = CONFIGS / "hf-causal-lm-tiny.toml"
TIMING = {"seconds", "cpu_seconds", "tokens_per_second"}
METHODS = {
    "none": ['method.name="none"'],
    "dropout-k2": ['method.name="dropout"', "method.k=2"],
    "analytic-double-backward": ['method.name="analytic"'],
    "analytic-jvp": ['method.name="analytic"', 'method.gradient="jvp"'],
    "analytic-hvp-difference": ['method.name="analytic"', 'method.gradient="hvp-difference"'],
    "rdrop": ['method.name="rdrop"'],
    "fraternal": ['method.name="fraternal"'],
}
SHORT = ["train.max_steps=3", "train.eval_every=3", "train.max_eval_batches=2"]


def metrics(run):
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in lines]


@pytest.fixture(params=["digits-mlp", "hf-causal-lm"])
def task_config(request):
    """The shipped config of each new task; skipped without its library."""
    if request.param == "digits-mlp":
        pytest.importorskip("sklearn", reason="digits-mlp needs scikit-learn")
        return DIGITS
    pytest.importorskip("transformers", reason="hf-causal-lm needs transformers")
    return HF


def test_an_unknown_model_name_lists_the_registered_tasks():
    with pytest.raises(ValueError, match="registered tasks") as err:
        load_config(TINY, ['model.name="gru"'])
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in TASKS)
    assert set(TASKS) >= {"lstm", "qrnn", "transformer", "hf-causal-lm", "digits-mlp"}
    with pytest.raises(ValueError, match="model.name must be one of the registered tasks"):
        task_class("gru")


@pytest.mark.parametrize("method", list(METHODS))
def test_each_task_trains_with_every_method(task_config, method, tmp_path):
    config = load_config(task_config, [*SHORT, *METHODS[method]])
    summary = train(config, tmp_path / "r", show_progress=False)
    logged = metrics(tmp_path / "r")
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert math.isfinite(logged[-1]["train_loss"]) and math.isfinite(summary["test_loss"])


def test_the_digits_classifier_learns_and_logs_its_accuracy(tmp_path):
    pytest.importorskip("sklearn", reason="digits-mlp needs scikit-learn")
    config = load_config(DIGITS, ["train.epochs=2"])
    summary = train(config, tmp_path / "r", show_progress=False)
    first, last = metrics(tmp_path / "r")
    assert last["val_loss"] < first["val_loss"] and last["val_accuracy"] > 0.5
    assert 0.5 < summary["test_accuracy"] <= 1.0


@pytest.mark.parametrize("stop", [5, 13], ids=["mid-epoch", "past-an-epoch"])
def test_each_task_resumes_exactly(task_config, stop, tmp_path):
    overrides = ["train.max_steps=16", "train.eval_every=4", "train.checkpoint_every=3"]
    overrides += ['method.name="dropout"', "method.k=2", "train.max_eval_batches=2"]
    if task_config == DIGITS:
        overrides.append("data.train_fraction=0.1")  # 107 images: an epoch of 3 batches
    config = load_config(task_config, overrides)
    straight = train(config, tmp_path / "a", show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "b", interrupt_at_step=stop, show_progress=False)
    resumed = train(config, tmp_path / "b", resume=True, show_progress=False)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert resumed["test_loss"] == straight["test_loss"]


def test_a_checkpoint_of_the_old_format_resumes_exactly(tmp_path):
    """A checkpoint whose state is ``flatten_state``'s list of (h, c), with no task entry."""
    config = load_config(TINY, ["train.max_steps=10", "train.checkpoint_every=3"])
    train(config, tmp_path / "a", show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "b", interrupt_at_step=7, show_progress=False)  # checkpoint: 6
    path = tmp_path / "b" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    state = unpack_state(ckpt["state"])
    assert isinstance(state, tuple) and len(state) == 2  # the LSTM's (h, c) per layer
    ckpt["state"] = flatten_state(state)
    del ckpt["task"]
    torch.save(ckpt, path)
    train(config, tmp_path / "b", resume=True, show_progress=False)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_carried_states_of_any_shape_survive_a_checkpoint():
    h, c = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    nested = ((h, c), [None, {"cache": h, "length": 3}], ())
    buffer = io.BytesIO()
    torch.save({"state": pack_state(nested)}, buffer)
    buffer.seek(0)
    back = unpack_state(torch.load(buffer, weights_only=True)["state"])
    assert type(back) is tuple and type(back[1]) is list and back[2] == ()
    assert torch.equal(back[0][1], c) and torch.equal(back[1][1]["cache"], h)
    assert back[1][1]["length"] == 3 and back[1][0] is None
    assert unpack_state(pack_state(None)) is None
    old = unpack_state(flatten_state(((h, c), (c, h))))  # the format before tasks
    assert old is not None and torch.equal(old[1][0], c) and torch.equal(old[1][1], h)
    assert unpack_state([]) is None
    with pytest.raises(TypeError, match="cannot hold a object"):
        pack_state((h, object()))


@pytest.mark.parametrize(
    "config, overrides, match",
    [
        (HF, ["model.hf.heads=3"], r"model.hf.heads \(3\) must divide model.hf.hidden_size"),
        (HF, ["model.hf.context=8"], r"model.hf.context \(8\) must be at least data.bptt"),
        (HF, ["model.hf.attn_pdrop=1.0"], r"model.hf.attn_pdrop must be in \[0, 1\)"),
        (HF, ['model.hf.architecture="bert"'], "model.hf.architecture must be one of"),
        (HF, ["model.hf.n_embd=8"], "unknown config key model.hf.n_embd"),
        (DIGITS, ['model.mlp.activation="swish"'], "model.mlp.activation must be one of"),
        (DIGITS, ["model.mlp.hidden_sizes=[64, 0]"], "model.mlp.hidden_sizes must be a list"),
        (DIGITS, ["model.mlp.p_hidden=-0.1"], r"model.mlp.p_hidden must be in \[0, 1\)"),
        (DIGITS, ["data.batch_size=5000"], "data.batch_size .* at most the 1077 training"),
        # another family's keys are refused, not ignored
        (DIGITS, ["model.hidden_size=8"], "model.hidden_size is not a key of model.name"),
        (DIGITS, ['data.corpus="ptb"'], "data.corpus is not read by model.name = 'digits-mlp'"),
        (DIGITS, ["data.bptt=20"], "data.bptt is not read"),
        (DIGITS, ["model.hf.layers=2"], r"\[model.hf\] is not for model.name = 'digits-mlp'"),
        (TINY, ["model.mlp.p_hidden=0.1"], r"\[model.mlp\] is not for model.name = 'lstm'"),
        (TINY, ['model.name="transformer"', "model.heads=3"], r"model.heads \(3\) must divide"),
    ],
)
def test_each_family_checks_its_own_keys(config, overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        load_config(config, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config", [DIGITS, HF, TINY], ids=["digits", "hf", "lstm"])
def test_a_resolved_config_reads_back_the_same(config, tmp_path):
    loaded = load_config(config)
    (tmp_path / "config.toml").write_text(to_toml(loaded))
    assert load_config(tmp_path / "config.toml") == loaded
    check_resumable(tmp_path / "config.toml", loaded)
    changed = load_config(config, ["optim.lr=0.5"])
    with pytest.raises(ValueError, match="optim.lr"):
        check_resumable(tmp_path / "config.toml", changed)


def test_a_changed_task_key_is_refused_on_resume(tmp_path):
    (tmp_path / "config.toml").write_text(to_toml(load_config(DIGITS)))
    with pytest.raises(ValueError, match="model.mlp"):
        check_resumable(tmp_path / "config.toml", load_config(DIGITS, ["model.mlp.p_hidden=0.2"]))


def test_a_language_model_config_resolves_to_flat_model_keys():
    text = to_toml(load_config(TINY))
    assert '[model]\nname = "lstm"\nembedding_size = 8\n' in text and "options" not in text
    assert "[model." not in text


def test_eval_of_a_classifier_run_and_measure_refuses_it(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="digits-mlp needs scikit-learn")
    run = tmp_path / "r"
    assert main(["train", str(DIGITS), "--out", str(run), "--set", "train.max_steps=4"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["eval", str(run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "test: loss" in out and "accuracy" in out
    with pytest.raises(ValueError, match="measure and noise-scale take the run of one of the"):
        runs.load_run(run)
    with pytest.raises(ValueError, match="'digits-mlp' run"):
        runs.measure_run(run)
    assert not (run / "measure").exists()


@pytest.mark.parametrize(
    "module, task, package",
    [("sklearn.datasets", "digits-mlp", "scikit-learn"), ("transformers", "hf-causal-lm", None)],
)
def test_a_missing_library_is_one_line_naming_the_extra(
    monkeypatch, tmp_path, module, task, package
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    config = load_config(DIGITS if task == "digits-mlp" else HF, ["train.max_steps=1"])
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'dropsplit\[tasks\]'") as err:
        train(config, tmp_path / "r", show_progress=False)
    assert f"the {task} task needs {package or module}" in str(err.value)
