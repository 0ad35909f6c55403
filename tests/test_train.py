import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dropsplit.cli import main
from dropsplit.training.config import OptimConfig, load_config
from dropsplit.training.trainer import Averager, build_optimizer, train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "synthetic-tiny.toml"
TIMING = {"seconds", "cpu_seconds", "tokens_per_second"}


def metrics(run):
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in lines]


def tiny(*overrides):
    return load_config(TINY, list(overrides))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_weight_decay_is_coupled_for_adam_and_decoupled_for_adamw(name):
    # with a zero loss gradient, Adam's first step normalizes the penalty's gradient wd * theta
    # to lr * sign(theta); AdamW shrinks the weights by the factor 1 - lr * wd
    lr, wd = 0.01, 0.1
    theta = torch.tensor([2.0, -0.5, 1e-3], dtype=torch.float64)
    param = torch.nn.Parameter(theta.clone())
    optimizer = build_optimizer(OptimConfig(name=name, lr=lr, weight_decay=wd), [param])
    param.grad = torch.zeros_like(param)
    optimizer.step()
    if name == "adam":
        g = wd * theta
        expected = theta - lr * g / (g.abs() + 1e-8)
    else:
        expected = theta * (1 - lr * wd)
    torch.testing.assert_close(param.detach(), expected)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=none"],
        ["method.name=dropout"],
        ["method.k=2", "method.implementation=batch"],
        ["method.k=2", "method.noise=difference"],
        ["method.k=2", "method.noise=analytic"],
        ["method.name=analytic"],
        ["method.name=analytic", "method.curvature=label", "method.implicit=false"],
        ["optim.name=adam", "optim.lr=0.003"],
        ["optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.1"],
        ["optim.name=ntasgd", "optim.nonmono=1"],
        ["method.name=rdrop", "method.alpha=1.0"],
        ["method.name=fraternal", "method.kappa=0.25"],
        ["method.name=analytic", "method.explicit_every=2", "method.implicit_every=3"],
        ["method.name=analytic", "method.start_step=3", "method.explicit_every=2"],
        ["method.name=analytic", "method.gradient=hvp-difference", "method.estimator.step=0.002"],
        [
            "method.name=analytic",
            "method.gradient=finite-difference",
            "method.estimator.per_example=false",
        ],
    ],
    ids=[
        "none",
        "dropout",
        "batch-k2",
        "difference",
        "analytic-noise",
        "analytic",
        "label",
        "adam",
        "adamw",
        "ntasgd",
        "rdrop",
        "fraternal",
        "analytic-lazy",
        "analytic-scheduled",
        "analytic-hvp-step",
        "analytic-fd-one-slope",
    ],
)
def test_every_method_trains_through_the_cli(tmp_path, overrides, capsys):
    args = [
        "train",
        str(TINY),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "train.max_steps=6",
        "--set",
        "train.eval_every=3",
    ]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    assert "best valid ppl" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and math.isfinite(summary["test_ppl"])
    assert len(metrics(tmp_path / "run")) == 2
    if "method.name=rdrop" in overrides or "method.name=fraternal" in overrides:
        assert all(m["penalty"] > 0 for m in metrics(tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 6
    assert load_config(tmp_path / "run" / "config.toml") == tiny(
        "train.max_steps=6", "train.eval_every=3", *overrides
    )


def test_resume_after_an_interruption_gives_identical_metrics(tmp_path):
    config = tiny(
        "train.max_steps=20",
        "train.eval_every=4",
        "train.checkpoint_every=3",
        "method.k=2",
        "method.noise=difference",
    )
    straight = train(config, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "b", interrupt_at_step=11)  # last checkpoint: step 9
    resumed = train(config, tmp_path / "b", resume=True)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert resumed["best_val_loss"] == straight["best_val_loss"]
    assert resumed["test_loss"] == straight["test_loss"]


def test_resume_across_epochs_with_variable_bptt(tmp_path):
    config = tiny(
        "train.max_steps=0",
        "train.epochs=2",
        "train.eval_every=0",
        "train.checkpoint_every=7",
        "data.train_fraction=0.05",
        "method.name=analytic",
    )
    train(config, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "b", interrupt_at_step=30)
    train(config, tmp_path / "b", resume=True)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert [m["epoch"] for m in metrics(tmp_path / "a")] == [1, 2]


def test_a_killed_process_resumes_exactly(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dropsplit",
        "train",
        str(TINY),
        "--set",
        "train.max_steps=400",
        "--set",
        "train.eval_every=50",
        "--set",
        "train.checkpoint_every=10",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd + ["--out", str(tmp_path / "a")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        cmd + ["--out", str(tmp_path / "b")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = tmp_path / "b" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["progress"]["step"] >= 120:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=True)["progress"]["step"]
    assert step < 400
    subprocess.run(
        cmd + ["--out", str(tmp_path / "b"), "--resume"], check=True, env=env, capture_output=True
    )
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_an_existing_run_is_not_overwritten(tmp_path):
    config = tiny("train.max_steps=2")
    train(config, tmp_path / "r")
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, tmp_path / "r")


@pytest.mark.parametrize("model", ["lstm", "qrnn", "transformer"])
def test_divergence_guard_skips_the_step(tmp_path, monkeypatch, model):
    import dropsplit.training.trainer as tr

    real = tr.build_method

    def flaky(cfg, seed, columns):
        method = real(cfg, seed, columns)
        step = method.step

        def maybe_nan(model, forward_fn, batch):
            result = step(model, forward_fn, batch)
            if maybe_nan.calls == 4:
                result.loss = float("nan")
                result.finite = False
            maybe_nan.calls += 1
            return result

        maybe_nan.calls = 0
        method.step = maybe_nan
        return method

    monkeypatch.setattr(tr, "build_method", flaky)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        summary = train(tiny("train.max_steps=8", f"model.name={model}"), tmp_path / "r")
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["best_val_loss"])


def _scale_explicit(monkeypatch, factor: Callable[[int], float]) -> list[float]:
    """Multiply the method's reported lambda R at call ``i`` (0-based) by ``factor(i)``.

    Returns the list of the reported values, one per call, filled as training runs.
    """
    import dropsplit.training.trainer as tr

    real, reported = tr.build_method, []

    def scaled(cfg, seed, columns):
        method = real(cfg, seed, columns)
        step = method.step

        def scaled_step(model, forward_fn, batch):
            result = step(model, forward_fn, batch)
            result.stats["explicit"] *= factor(len(reported))
            reported.append(result.stats["explicit"])
            return result

        method.step = scaled_step
        return method

    monkeypatch.setattr(tr, "build_method", scaled)
    return reported


def test_a_spike_of_the_explicit_term_is_skipped(tmp_path, monkeypatch):
    """One step whose lambda R is 15 times its running mean (a rare sampled label) is skipped
    like a diverged loss; the steps around it are taken."""
    taken = _scale_explicit(monkeypatch, lambda i: 15.0 if i == 14 else 1.0)
    config = tiny("train.max_steps=20", "method.name=analytic")
    with pytest.warns(RuntimeWarning, match="explicit term .* x its mean .*; step skipped"):
        summary = train(config, tmp_path / "r")
    assert summary["skipped_steps"] == 1 and len(taken) == 20


def test_a_lasting_rise_of_the_explicit_term_is_followed_not_skipped_forever(tmp_path, monkeypatch):
    """From step 12 on lambda R is 20 times larger for good (as early in training, when it
    grows fast): a few steps are skipped while the running mean catches up, then training goes
    on (the mean once moved only on taken steps, so every later step was skipped)."""
    _scale_explicit(monkeypatch, lambda i: 20.0 if i >= 11 else 1.0)
    with pytest.warns(RuntimeWarning, match="explicit term"):
        summary = train(tiny("train.max_steps=30", "method.name=analytic"), tmp_path / "r")
    assert 1 <= summary["skipped_steps"] <= 6


def test_divergence_guard_can_restore_the_checkpoint(tmp_path, monkeypatch):
    import dropsplit.training.trainer as tr

    monkeypatch.setattr(tr, "diverged", lambda loss, progress, factor: progress.step == 7)
    with pytest.warns(RuntimeWarning, match="restored"):
        summary = train(tiny("train.max_steps=9", "train.divergence=restore"), tmp_path / "r")
    assert summary["skipped_steps"] == 1


def test_averager_starts_on_the_non_monotone_criterion():
    p = torch.nn.Parameter(torch.zeros(2))
    avg = Averager([p], nonmono=2)
    assert not avg.maybe_start([3.0, 2.0, 1.0])
    assert avg.maybe_start([3.0, 2.0, 2.5, 2.6])
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            p.fill_(value)
        avg.update()
    assert torch.allclose(avg.average[0], torch.full((2,), 1.5))  # mean of 0, 1, 2, 3
    avg.swap()
    assert torch.allclose(p, torch.full((2,), 1.5))


@pytest.mark.parametrize(
    "override, match",
    [
        ("method.nmae=analytic", "unknown config key method.nmae"),
        ("method.k=two", "method.k must be a int"),
        ("method.k=0", "method.k must be positive"),
        ("method.name=magic", "method.name must be one of"),
        ("model.p_input=1.5", r"model.p_input must be in \[0, 1\)"),
        ("optimizer.lr=1", r"unknown config section \[optimizer\]"),
        ("lr=1", "section.key"),
        ("data.train_fraction=0", "data.train_fraction"),
        ("method.alpha=-1", "method.alpha must be >= 0"),
    ],
)
def test_bad_config_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        tiny(override)


def test_deprecated_config_key_explicit_is_read_as_curvature():
    with pytest.warns(DeprecationWarning, match="method.curvature"):
        old = tiny('method.explicit="label"')
    assert old.method.curvature == tiny('method.curvature="label"').method.curvature == "label"
    with pytest.raises(ValueError, match="both"):
        load_config(TINY, ['method.explicit="label"', 'method.curvature="exact"'])


def test_cli_reports_config_errors(capsys):
    assert main(["train", str(TINY), "--set", "method.k=0"]) == 2
    assert "method.k must be positive" in capsys.readouterr().err


def test_eval_command(tmp_path, capsys):
    main(["train", str(TINY), "--out", str(tmp_path / "r"), "--set", "train.max_steps=3"])
    assert main(["eval", str(tmp_path / "r"), "--split", "valid"]) == 0
    assert "valid: loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("min_epochs", "logged", "test_loss"),
    [
        (0, [3.0, 2.0, 2.5, 2.1], 2.2),  # two epochs without a better loss end the run
        (6, [3.0, 2.0, 2.5, 2.1, 2.2, 1.0, 1.5, 1.6], 0.5),  # it outlasts its plateau, improves
    ],
    ids=["patience-alone", "min-epochs-6"],
)
def test_early_stopping_on_scripted_losses(tmp_path, monkeypatch, min_epochs, logged, test_loss):
    """Patience 2 on scripted validation losses; ``min_epochs`` holds the stop off."""
    from dropsplit.training.tasks import Evaluation, LanguageModelTask

    losses = iter([3.0, 2.0, 2.5, 2.1, 2.2, 1.0, 1.5, 1.6, 0.5])
    monkeypatch.setattr(LanguageModelTask, "evaluate", lambda *args: Evaluation(next(losses)))
    config = tiny(
        "train.max_steps=0",
        "train.eval_every=0",
        "train.epochs=9",
        "train.patience=2",
        f"train.min_epochs={min_epochs}",
        "data.train_fraction=0.02",  # 10 steps an epoch: the losses are scripted
    )
    summary = train(config, tmp_path / "run")
    assert [m["val_loss"] for m in metrics(tmp_path / "run")] == logged
    assert summary["epochs"] == len(logged) and summary["best_val_loss"] == min(logged)
    assert summary["test_loss"] == test_loss  # the next value: the test evaluation


@pytest.mark.parametrize("key", ["train.patience", "train.min_epochs"])
def test_early_stopping_settings_are_not_negative(key):
    with pytest.raises(ValueError, match=f"{key} must be >= 0"):
        tiny(f"{key}=-1")


def test_resume_refuses_nothing_to_resume_and_a_changed_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny("train.max_steps=2"), tmp_path / "empty", resume=True)
    train(tiny("train.max_steps=4", "train.eval_every=2"), tmp_path / "r")
    with pytest.raises(ValueError, match=r"optim.lr 5.0 -> 1.0"):
        train(tiny("train.max_steps=6", "optim.lr=1.0"), tmp_path / "r", resume=True)
    with pytest.raises(ValueError, match=r"model.hidden_size 12 -> 16"):
        train(tiny("train.max_steps=6", "model.hidden_size=16"), tmp_path / "r", resume=True)
    summary = train(tiny("train.max_steps=6", "train.eval_every=2"), tmp_path / "r", resume=True)
    assert summary["steps"] == 6  # max_steps may change on resume, and config.toml records it
    assert load_config(tmp_path / "r" / "config.toml").train.max_steps == 6


def test_a_torn_metrics_line_does_not_block_resume(tmp_path):
    config = tiny("train.max_steps=8", "train.eval_every=2", "train.checkpoint_every=100")
    straight = train(config, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "b", interrupt_at_step=4)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "val_lo')  # a kill in the middle of a write
    resumed = train(config, tmp_path / "b", resume=True)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert resumed["best_val_loss"] == straight["best_val_loss"]


def test_a_rerun_after_a_kill_before_the_first_checkpoint_logs_each_line_once(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 2, "val_ppl": 9.0}\n')
    # any run file counts as a run: a plain rerun is refused, --overwrite starts clean
    with pytest.raises(FileExistsError, match=r"holds a run \(metrics.jsonl\); pass --overwrite"):
        train(tiny("train.max_steps=4", "train.eval_every=2"), tmp_path / "r")
    train(tiny("train.max_steps=4", "train.eval_every=2"), tmp_path / "r", overwrite=True)
    steps = [m["step"] for m in metrics(tmp_path / "r")]
    assert steps == sorted(set(steps))


def test_an_output_path_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ValueError, match="cannot be a run directory"):
        train(tiny("train.max_steps=2"), tmp_path / "out")


def test_an_unwritable_output_directory_is_one_clear_error(tmp_path, monkeypatch, capsys):
    # as root (CI, containers) chmod cannot make a directory unwritable: ask os.access instead
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if p == tmp_path else real_access(p, mode)
    )
    assert main(["train", str(TINY), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is not writable" in capsys.readouterr().err


def test_timings_record_cpu_time_threads_and_machine(tmp_path):
    summary = train(tiny("train.max_steps=4", "train.eval_every=2"), tmp_path / "r")
    assert summary["threads"] == torch.get_num_threads() and summary["machine"]
    assert summary["device"] == "cpu"
    assert 0 < summary["train_cpu_seconds"]
    lines = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < lines[0]["cpu_seconds"] < lines[1]["cpu_seconds"] == summary["train_cpu_seconds"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match='set train.device="cpu"'):
        train(tiny('train.device="cuda"'), tmp_path / "r")


def test_data_paths_with_quotes_and_backslashes_reach_the_config_intact(tmp_path):
    from dropsplit.training.config import string_override

    odd = str(tmp_path / 'a "quoted" dir\\with backslash')
    assert load_config(TINY, [string_override("data.path", odd)]).data.path == odd


@pytest.mark.slow  # test_a_killed_process_resumes_exactly is its fast tier
def test_five_kill_9s_at_random_moments_then_resume_give_identical_metrics(tmp_path):
    """kill -9 five times in a row (checkpoint writes included, any moment), resuming each time
    (or starting again when no checkpoint was written yet): the metrics of the finished run are
    those of an uninterrupted one, no line missing or repeated, and no checkpoint half-written."""
    import random

    cmd = [sys.executable, "-m", "dropsplit", "train", str(TINY)]
    for kv in (
        "train.epochs=5",
        "train.max_steps=2500",
        "train.eval_every=40",
        "train.checkpoint_every=7",
    ):
        cmd += ["--set", kv]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "a")], check=True, env=env, capture_output=True)
    out, ckpt, rng = tmp_path / "b", tmp_path / "b" / "checkpoint.pt", random.Random(5)
    # the first kill during start-up (before any checkpoint), then at random steps: the kill
    # follows the step's checkpoint by a random 0-20 ms, so it may land inside the next write
    targets = [None, *sorted(rng.sample(range(30, 1500), 4))]
    for target in targets:
        # no checkpoint yet: the files a killed start left count as a run, replaced on request
        resume = ["--resume"] if ckpt.exists() else ["--overwrite"]
        proc = subprocess.Popen(
            cmd + ["--out", str(out), *resume],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if target is None:
            time.sleep(rng.uniform(0.2, 0.6))
        else:
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                if (
                    ckpt.exists()
                    and torch.load(ckpt, weights_only=True)["progress"]["step"] >= target
                ):
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.02))
        assert proc.poll() is None  # still training when killed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if ckpt.exists():
            torch.load(ckpt, weights_only=True)  # whole, never half-written
    resume = ["--resume"] if ckpt.exists() else ["--overwrite"]
    subprocess.run(cmd + ["--out", str(out), *resume], check=True, env=env, capture_output=True)
    steps = [m["step"] for m in metrics(out)]
    assert steps == sorted(set(steps))
    assert metrics(tmp_path / "a") == metrics(out)


def test_an_existing_run_is_replaced_only_with_overwrite(tmp_path, capsys):
    args = ["train", str(TINY), "--out", str(tmp_path / "r"), "--set", "train.max_steps=4"]
    assert main(args) == 0
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--set", "optim.lr=1.0", "--overwrite"]) == 0
    assert load_config(tmp_path / "r" / "config.toml").optim.lr == 1.0
    assert main([*args, "--resume", "--overwrite"]) == 2


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_the_learning_rate_decays_after_its_epoch_and_not_before(name, tmp_path):
    """The paper's WikiText-103 QRNN schedule (AWD's --when 12 --lr_decay 0.1): epoch 1 trains
    exactly as without the decay, epoch 2 at lr * lr_decay (times AWD's window scaling for SGD)."""
    common = (
        "data.train_fraction=0.02",
        "train.epochs=2",
        "train.max_steps=0",
        f"optim.name={name}",
    )
    common += ("train.eval_every=0", "data.variable_bptt=false", "optim.lr=0.01")
    plain = train(tiny(*common), tmp_path / "plain")
    decayed = train(
        tiny(*common, "optim.decay_after=1", "optim.lr_decay=0.5"), tmp_path / "decayed"
    )
    first, second = metrics(tmp_path / "plain"), metrics(tmp_path / "decayed")
    assert first[0] == second[0] and first[1] != second[1]  # epoch 1 equal, epoch 2 not
    lrs = []
    for run in ("plain", "decayed"):
        ckpt = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)
        lrs.append(ckpt["optimizer"]["param_groups"][0]["lr"])
    # SGD's last window is shorter than bptt, and AWD scales its lr by the window length
    assert lrs[1] == pytest.approx(0.5 * lrs[0]) and (name == "sgd" or lrs[0] == 0.01)
    assert plain["epochs"] == decayed["epochs"] == 2
