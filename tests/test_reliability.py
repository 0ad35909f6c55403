"""Faults and bad inputs (issue 30): locks, the divergence guard, bounded downloads, safe names,
and one-line errors for damaged files, full disks and signals."""

import errno
import gzip
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from dropsplit import data, fetch
from dropsplit.cli import main
from dropsplit.training import checkpoint
from dropsplit.training.config import load_config
from dropsplit.training.trainer import DivergedError, Trainer, train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "synthetic-tiny.toml"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def tiny(*overrides):
    return load_config(TINY, list(overrides))


def lines(run):
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def args(out, *overrides):
    argv = ["train", str(TINY), "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]
    return argv


# ---- item 1: one trainer per run directory, unique temporaries, fsync ------------------------


def test_a_second_trainer_on_the_same_directory_is_refused_naming_the_pid(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dropsplit.training.checkpoint import RunLock; "
            f"lock = RunLock({str(out)!r}); lock.acquire(); print('locked', flush=True); "
            "time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(args(out, "train.max_steps=2")) == 2
        err = capsys.readouterr().err
        assert f"is in use by another dropsplit process (PID {holder.pid})" in err
        assert len(err.strip().splitlines()) == 1
        assert not (out / "metrics.jsonl").exists()  # nothing of the other's was touched
    finally:
        holder.send_signal(signal.SIGKILL)  # the lock dies with its process
        holder.wait()
    assert main(args(out, "train.max_steps=2")) == 0


def test_the_lock_is_held_while_a_trainer_lives_and_released_after(tmp_path):
    trainer = Trainer(tiny("train.max_steps=2"), tmp_path / "r", show_progress=False)
    with pytest.raises(
        FileExistsError, match=f"in use by another dropsplit process .PID {os.getpid()}"
    ):
        train(tiny("train.max_steps=2"), tmp_path / "r", overwrite=True)
    trainer.run()
    train(tiny("train.max_steps=2"), tmp_path / "r", overwrite=True)  # released at the end


def test_atomic_writes_use_unique_temporaries_fsync_and_sync_the_directory(tmp_path, monkeypatch):
    synced, temporaries = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    target = tmp_path / "checkpoint.pt"
    for _ in range(2):
        checkpoint.atomic_write(target, lambda p: temporaries.append(p) or p.write_text("x"))
    assert temporaries[0] != temporaries[1]
    assert all(p.parent == tmp_path and p.name != "checkpoint.pt.tmp" for p in temporaries)
    assert len(synced) == 4  # the file and its directory, each time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_full_disk_is_one_line_and_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    checkpoint.save_json({"old": 1}, target)

    def full(obj, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"cannot write .*summary.json: the write failed .*free disk"):
        checkpoint.save_torch({}, target)

    def enospc(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", enospc)
    with pytest.raises(OSError, match="the disk is full: free disk space"):
        checkpoint.save_json({"new": 1}, target)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_full_disk_while_training_is_one_line_through_the_cli(tmp_path, monkeypatch, capsys):
    real = torch.save

    def full(obj, path, *a, **k):
        if "checkpoint.pt" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    assert main(args(tmp_path / "r", "train.max_steps=6")) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: the write failed" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "r").glob(".*.tmp"))


# ---- item 5: the divergence guard ------------------------------------------------------------


def _patch_steps(monkeypatch, change):
    """``change(call, result, model)`` after each of the method's steps (0-based calls)."""
    import dropsplit.training.trainer as tr

    real = tr.build_method

    def patched(cfg, seed, columns):
        method = real(cfg, seed, columns)
        step, calls = method.step, [0]

        def changed(model, forward_fn, batch):
            result = step(model, forward_fn, batch)
            change(calls[0], result, model)
            calls[0] += 1
            return result

        method.step = changed
        return method

    monkeypatch.setattr(tr, "build_method", patched)


@pytest.mark.parametrize("clip", ["optim.clip=0.25", "optim.clip=0"], ids=["clipped", "unclipped"])
def test_a_nan_gradient_with_a_finite_loss_is_skipped_not_applied(tmp_path, monkeypatch, clip):
    def poison(call, result, model):
        if call == 4:
            next(model.parameters()).grad[0] = float("nan")  # the loss stays finite

    _patch_steps(monkeypatch, poison)
    with pytest.warns(RuntimeWarning, match="step 5: gradient not finite .*; step skipped"):
        summary = train(tiny("train.max_steps=12", "train.eval_every=6", clip), tmp_path / "r")
    assert summary["skipped_steps"] == 1
    assert math.isfinite(summary["best_val_loss"]) and math.isfinite(summary["test_loss"])
    weights = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["model"]
    assert all(w.isfinite().all() for w in weights.values())


def test_a_lasting_rise_of_the_loss_moves_its_mean_and_is_not_skipped_forever(
    tmp_path, monkeypatch
):
    """From the 12th step on the loss reads 10 times higher, for good: the running mean moves on
    skipped steps too, so a few are skipped and training goes on (once, every later step was)."""

    def rise(call, result, model):
        if call >= 11:
            result.loss *= 10.0

    _patch_steps(monkeypatch, rise)
    with pytest.warns(RuntimeWarning, match="diverged; step skipped"):
        summary = train(tiny("train.max_steps=30"), tmp_path / "r")
    assert 1 <= summary["skipped_steps"] <= 6


def test_steps_skipped_in_a_row_stop_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    def nan_from_the_fourth(call, result, model):
        if call >= 3:
            result.loss, result.finite = float("nan"), False

    _patch_steps(monkeypatch, nan_from_the_fourth)
    with pytest.warns(RuntimeWarning):
        code = main(args(tmp_path / "r", "train.max_steps=20", "train.max_skips=4"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run diverged: 4 steps in a row skipped" in err[0]
    assert "up to step 7" in err[0] and "its last checkpoint (step 5) is kept" in err[0]
    assert not (tmp_path / "r" / "summary.json").exists()  # no result that looks like one
    with pytest.raises(DivergedError), pytest.warns(RuntimeWarning):
        train(tiny("train.max_steps=20", "train.max_skips=4"), tmp_path / "s")


def test_the_final_line_reports_skipped_steps_and_no_interval_logs_a_zero_loss(
    tmp_path, monkeypatch, capsys
):
    def skip_third_and_fourth(call, result, model):
        if call in (2, 3):
            result.loss, result.finite = float("nan"), False

    _patch_steps(monkeypatch, skip_third_and_fourth)
    with pytest.warns(RuntimeWarning):
        assert main(args(tmp_path / "r", "train.max_steps=6", "train.eval_every=2")) == 0
    assert "6 steps (2 skipped)" in capsys.readouterr().out
    logged = lines(tmp_path / "r")
    assert [m["train_loss"] is None for m in logged] == [False, True, False]
    assert [m["skipped"] for m in logged] == [0, 2, 2]


def test_a_checkpoint_with_non_finite_weights_is_refused_at_resume(tmp_path):
    config = tiny("train.max_steps=4", "train.eval_every=2")
    train(config, tmp_path / "r")
    path = tmp_path / "r" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    next(iter(ckpt["model"].values()))[0] = float("nan")
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"holds non-finite weights .*step 4.*--overwrite"):
        train(tiny("train.max_steps=8", "train.eval_every=2"), tmp_path / "r", resume=True)


# ---- item 6: numbers in the config -----------------------------------------------------------


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
        ("train.divergence_factor=nan", "train.divergence_factor must be a finite number"),
        ("method.explicit_scale=-inf", "method.explicit_scale must be a finite number"),
        ("model.p_input=nan", "model.p_input must be a finite number"),
        ("data.train_fraction=nan", "data.train_fraction must be a finite number"),
        ("optim.weight_decay=nan", "optim.weight_decay must be a finite number"),
        ("optim.clip=-1", "optim.clip must be >= 0"),
        ("optim.nonmono=0", "optim.nonmono must be positive"),
        ('train.device="foo"', "train.device must name a device"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused_naming_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        tiny(override)


def test_a_huge_value_is_not_echoed_whole():
    with pytest.raises(ValueError) as err:
        tiny(f'method.name="{"x" * 10_000_000}"')
    assert len(str(err.value)) < 300 and "10,000,002 characters" in str(err.value)


# ---- item 3: any run file counts as a run; foreign files ------------------------------------


@pytest.mark.parametrize("name", ["best.pt", "summary.json", "metrics.jsonl", "config.toml"])
def test_any_run_file_counts_as_a_run(tmp_path, capsys, name):
    out = tmp_path / "r"
    out.mkdir()
    (out / name).write_text("the user's")
    assert main(args(out, "train.max_steps=2")) == 2
    assert f"already holds a run ({name}); pass --overwrite" in capsys.readouterr().err
    assert (out / name).read_text() == "the user's"
    assert main([*args(out, "train.max_steps=2"), "--overwrite"]) == 0


def test_an_output_directory_with_foreign_files_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("mine")
    (tmp_path / "metrics.jsonl").write_text("mine too\n")
    for extra in ([], ["--overwrite"]):
        assert main([*args(".", "train.max_steps=2"), *extra]) == 2
        assert "holds files that are not a run's (notes.md)" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == "mine too\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "notes.md"]


# ---- item 7 and 13: best.pt and checkpoints checked, one line each ----------------------------


def _finished(tmp_path, steps=4):
    config = tiny(f"train.max_steps={steps}", "train.eval_every=2")
    train(config, tmp_path / "r")
    return tmp_path / "r"


def test_a_missing_or_damaged_best_pt_stops_a_resume_before_any_training(tmp_path):
    run = _finished(tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    more = tiny("train.max_steps=8", "train.eval_every=2")
    (run / "best.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"best.pt is damaged \(.*\): start the run again"):
        train(more, run, resume=True)
    (run / "best.pt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"best.pt is missing, though the run has evaluated"
    ):
        train(more, run, resume=True)
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not-a-dict", "no-model"])
def test_a_damaged_checkpoint_at_resume_is_one_line(tmp_path, capsys, damage):
    run = _finished(tmp_path)
    path = run / "checkpoint.pt"
    whole = path.read_bytes()
    payload = {
        "truncated": whole[: len(whole) // 2],
        "empty": b"",
        "garbage": b"\x00garbage" * 10,
    }
    if damage in payload:
        path.write_bytes(payload[damage])
    elif damage == "not-a-dict":
        torch.save([1, 2], path)
    else:
        ckpt = torch.load(path, weights_only=True)
        del ckpt["model"]
        torch.save(ckpt, path)
    assert main([*args(run, "train.max_steps=8", "train.eval_every=2"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt is damaged" in err[0] and "--overwrite" in err[0]


@pytest.mark.parametrize("command", ["eval", "measure", "noise-scale"])
def test_damaged_or_foreign_weights_are_one_line_in_eval_and_measure(tmp_path, capsys, command):
    run = _finished(tmp_path)
    (run / "best.pt").write_bytes(b"PK\x03\x04 not a torch file")
    assert main([command, str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best.pt is damaged" in err[0] and "--overwrite" in err[0]
    other = torch.nn.Linear(2, 2).state_dict()
    torch.save(other, run / "best.pt")
    assert main([command, str(run)]) == 2
    assert "best.pt is damaged (weights of another model" in capsys.readouterr().err


def test_measure_refuses_a_read_only_directory_before_computing(tmp_path, monkeypatch, capsys):
    import dropsplit.measure.effects as effects

    run = _finished(tmp_path)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == run / "measure" else real_access(p, mode)
    )
    monkeypatch.setattr(effects, "measure_effects", lambda *a, **k: pytest.fail("computed"))
    assert main(["measure", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the measurement to {run / 'measure'}: the directory is read-only" in err


def test_measure_and_noise_scale_write_atomically(tmp_path, monkeypatch):
    from dropsplit.training.runs import noise_scale_run

    run = _finished(tmp_path)
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append(Path(b).name) or real(a, b))
    noise_scale_run(run, batches=2, samples=2)
    assert "noise_scale.json" in replaced


# ---- items 11 and 17: names, seeds ----------------------------------------------------------

SUITE_BASE = """
[data]
corpus = "synthetic"
batch_size = 4
eval_batch_size = 4
test_batch_size = 4
bptt = 8
[model]
embedding_size = 6
hidden_size = 8
layers = 1
implementation = "loop"
[method]
name = "none"
[optim]
lr = 5.0
[train]
max_steps = 4
eval_every = 2
checkpoint_every = 2
max_eval_batches = 2
"""


def _suite(tmp_path, names, seeds=1):
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / "base.toml").write_text(SUITE_BASE)
    runs = "".join(f'[[run]]\nname = {json.dumps(n)}\ngroup = "g"\nset = []\n' for n in names)
    (tmp_path / "s" / "suite.toml").write_text(f'base = "base.toml"\nseeds = {seeds}\n{runs}')
    return tmp_path / "s" / "suite.toml"


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", "..", ".", "a/b", "", "a b"])
def test_run_names_that_are_not_plain_names_are_refused(tmp_path, name):
    from dropsplit.experiments.reproduce import load_suite

    with pytest.raises(ValueError, match="must be letters, digits, '.', '_' or '-'"):
        load_suite(_suite(tmp_path, [name]))


def test_run_directories_resolve_under_the_output(tmp_path):
    from dropsplit.experiments.reproduce import run_directory

    assert run_directory(tmp_path, "dropout-1.k_2", 0) == tmp_path / "dropout-1.k_2" / "seed0"
    for name, seed in (("..", 0), ("../x", 0), ("ok", -1), ("ok", "0/../../x")):
        with pytest.raises(ValueError):
            run_directory(tmp_path, name, seed, "run.json")


def test_reproduce_with_zero_seeds_is_an_error(tmp_path, capsys):
    suite = _suite(tmp_path, ["a"])
    assert (
        main(["reproduce", "--suite", str(suite), "--out", str(tmp_path / "o"), "--seeds", "0"])
        == 2
    )
    assert "--seeds must be at least 1, got 0" in capsys.readouterr().err


def test_a_failing_run_is_named_and_the_others_are_reported(tmp_path, capsys):
    suite = _suite(tmp_path, ["good", "bad", "diverged"])
    out = tmp_path / "o"
    (out / "bad" / "seed0").mkdir(parents=True)
    (out / "bad" / "seed0" / "checkpoint.pt").write_bytes(b"garbage")  # resumed: no config
    argv = ["reproduce", "--suite", str(suite), "--out", str(out), "--no-measure"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "bad/seed0: FAILED: config file " in captured.out
    assert "bad/seed0/config.toml does not exist" in captured.out
    assert "Report: " in captured.out and "1 run(s) FAILED: bad/seed0" in captured.err
    assert (out / "good" / "seed0" / "summary.json").exists()
    spec = json.loads((out / "good" / "seed0" / "run.json").read_text())
    assert spec["name"] == "good"
    # a run that diverged (best validation inf) is named, not a crash of the whole report
    summary_path = out / "diverged" / "seed0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "best_val_loss": math.inf}))
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "diverged/seed0: FAILED: " in captured.out
    assert "the run diverged (best validation loss inf): left out of the report" in captured.out
    assert "Report: " in captured.out
    assert "2 run(s) FAILED: bad/seed0, diverged/seed0" in captured.err


# ---- item 12 and issue 31 item 4: bounded downloads -------------------------------------------


def _serve(handler):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


class Endless(BaseHTTPRequestHandler):
    """No length, a body far longer than the file (or a trickle of a byte every 0.2 s); finite,
    so that code without the bounds fails the test instead of filling the disk or hanging."""

    trickle = False

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(40 if self.trickle else 64):  # 8 s, or 4 MiB
                self.wfile.write(b"x" if self.trickle else b"x" * 65536)
                self.wfile.flush()
                if self.trickle:
                    time.sleep(0.2)
        except OSError:
            pass


def _one_file(monkeypatch, url, raw=b"hello\n", size=None, member=""):
    local = fetch.CorpusFile(
        "tinyshakespeare",
        "input.txt.gz",
        "" if member else hashlib.sha256(raw).hexdigest(),
        url,
        len(raw) if size is None else size,
        0,
        sha1=hashlib.sha1(raw).hexdigest() if member else "",
        member=member,
    )
    monkeypatch.setattr(fetch, "files_of", lambda name: (local,))
    monkeypatch.delenv("DROPSPLIT_MIRROR", raising=False)
    return local


def test_an_endless_download_stops_past_the_known_size(tmp_path, monkeypatch):
    httpd, url = _serve(Endless)
    try:
        _one_file(monkeypatch, f"{url}/input.txt")
        with pytest.raises(fetch.FetchError, match="sent more than 1,048,582 bytes"):
            fetch.fetch(["tinyshakespeare"], tmp_path / "d", progress=False)
    finally:
        httpd.shutdown()
    assert not (tmp_path / "d").exists()  # no part kept, and the directories it made are gone


def test_a_trickling_server_meets_the_deadline(tmp_path, monkeypatch):
    Endless.trickle = True
    httpd, url = _serve(Endless)
    monkeypatch.setattr(fetch, "DEADLINE_S", 1.0)
    monkeypatch.setattr(fetch, "MIN_BYTES_PER_S", 10**12)
    try:
        _one_file(monkeypatch, f"{url}/input.txt")
        started = time.monotonic()
        with pytest.raises(fetch.FetchError, match="too slow: .* bytes in 1 s"):
            fetch.fetch(["tinyshakespeare"], tmp_path / "d", progress=False)
        assert time.monotonic() - started < 10
    finally:
        Endless.trickle = False
        httpd.shutdown()


class Broken(BaseHTTPRequestHandler):
    """A status line that is not HTTP, or a body cut short of its Content-Length."""

    cut = False

    def log_message(self, *a):
        pass

    def do_GET(self):
        if not self.cut:
            self.wfile.write(b"garbage\r\n\r\n")
            return
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)


@pytest.mark.parametrize("cut", [False, True], ids=["bad-status-line", "incomplete-read"])
def test_a_broken_server_is_one_line(tmp_path, monkeypatch, capsys, cut):
    Broken.cut = cut
    httpd, url = _serve(Broken)
    try:
        _one_file(monkeypatch, f"{url}/input.txt")
        assert main(["data", "fetch", "tinyshakespeare", "--to", str(tmp_path / "d")]) == 2
    finally:
        httpd.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    expected = "connection lost (IncompleteRead(" if cut else "network failure ("
    assert expected in err[-1] and "Traceback" not in "".join(err)


def _bomb(n=64 << 20):
    return gzip.compress(b"\0" * n, compresslevel=9)


def test_a_gzip_bomb_from_a_mirror_is_stopped_while_decompressing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "tinyshakespeare"
    mirror.mkdir(parents=True)
    (mirror / "input.txt.gz").write_bytes(_bomb())
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "mirror"))
    handler.log_message = lambda *a: None
    httpd, url = _serve(handler)
    try:
        _one_file(monkeypatch, "unused", size=1000)
        with pytest.raises(fetch.FetchError, match="runs past 1,049,576 bytes"):
            fetch.fetch(["tinyshakespeare"], tmp_path / "d", mirror=url, progress=False)
    finally:
        httpd.shutdown()
    assert not list((tmp_path / "d").rglob("*.part"))


def test_a_zip_bomb_member_is_stopped_and_the_archive_deleted(tmp_path, monkeypatch):
    served = tmp_path / "srv"
    served.mkdir()
    with zipfile.ZipFile(served / "wt.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("wt/train.tokens", b"\0" * (64 << 20))
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    httpd, url = _serve(handler)
    try:
        _one_file(monkeypatch, f"{url}/wt.zip", size=1000, member="wt/train.tokens")
        with pytest.raises(fetch.FetchError, match="more than 1,049,576"):
            fetch.fetch(["tinyshakespeare"], tmp_path / "d", progress=False)
    finally:
        httpd.shutdown()
    assert not list((tmp_path / "d").rglob("*"))


def test_an_encrypted_member_deletes_the_archive(tmp_path, monkeypatch):
    archive = tmp_path / "d" / "tinyshakespeare" / "wt.zip"
    archive.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("wt/train.tokens", b"text")
    raw = bytearray(buffer.getvalue())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the encrypted bit
        at = raw.index(signature)
        raw[at + offset] |= 1
    archive.write_bytes(bytes(raw))
    _one_file(monkeypatch, "http://127.0.0.1:9/wt.zip", raw=b"text", member="wt/train.tokens")
    with pytest.raises(fetch.FetchError, match="the member is encrypted; deleted"):
        fetch.fetch(["tinyshakespeare"], tmp_path / "d", progress=False)
    assert not archive.exists()


def test_verify_and_reading_stop_a_gzip_bomb(tmp_path):
    path = tmp_path / "tinyshakespeare" / "input.txt.gz"
    path.parent.mkdir()
    path.write_bytes(_bomb())
    file = fetch.files_of("tinyshakespeare")[0]
    assert fetch.decompressed_digest(path, file) is None
    with pytest.raises(ValueError, match="runs past 2,163,970 bytes"):
        data.load_corpus("tinyshakespeare", tmp_path, download=False)
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage")  # a zlib.error
    assert fetch.decompressed_digest(path, file) is None
    with pytest.raises(ValueError, match="corrupt corpus file"):
        data.load_corpus("tinyshakespeare", tmp_path, download=False)


def test_a_failed_fetch_removes_the_directories_it_created(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DROPSPLIT_MIRROR", raising=False)
    target = tmp_path / "new" / "data"
    closed = "http://127.0.0.1:9"
    assert main(["data", "fetch", "ptb", "--to", str(target), "--mirror", closed]) == 2
    assert "network failure" in capsys.readouterr().err
    assert not target.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["data", "fetch", "ptb", "--to", str(kept), "--mirror", closed]) == 2
    assert kept.is_dir() and not list(kept.iterdir())  # the user's directory stays, emptied


def test_streamed_gzip_is_byte_for_byte_gzip_compress(tmp_path):
    raw = os.urandom(100_000) + b"text " * 50_000
    file = fetch.CorpusFile("c", "f.txt.gz", hashlib.sha256(raw).hexdigest(), "u", len(raw), 0)
    target, part = tmp_path / "f.txt.gz", tmp_path / "f.txt.gz.part"
    chunks = (raw[i : i + 4096] for i in range(0, len(raw), 4096))
    fetch._store(file, chunks, "u", target, part)
    assert target.read_bytes() == gzip.compress(raw, compresslevel=9, mtime=0)


# ---- item 17: SIGTERM; issue 29 item 3: the commit of each run ---------------------------------


def test_sigterm_ends_train_with_a_checkpoint_and_the_resume_line(tmp_path):
    """No evaluation and no periodic checkpoint in the first 4000 steps: the checkpoint found
    after SIGTERM is the one it wrote."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "dropsplit", "train", str(TINY), "--out", str(out)]
    for kv in (
        "train.max_steps=0",
        "train.eval_every=0",
        "train.checkpoint_every=100000",
        "data.batch_size=1",  # 4000 steps an epoch
    ):
        cmd += ["--set", kv]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (out / "config.toml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.5)  # training
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "continues with --resume" in err and "Traceback" not in err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["step"]
    assert 0 < step < 4000 and not (out / "metrics.jsonl").exists()
    assert not (out / "summary.json").exists()


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _suite_workers(tmp_path, names):
    """A --jobs 2 suite of long runs, once both workers have checkpointed: (proc, out, pids)."""
    suite = _suite(tmp_path, names)
    text = suite.with_name("base.toml").read_text()
    suite.with_name("base.toml").write_text(
        text.replace("max_steps = 4", "max_steps = 0\nepochs = 50")
        .replace("eval_every = 2", "eval_every = 0")
        .replace("checkpoint_every = 2", "checkpoint_every = 20")
    )
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "dropsplit", "reproduce", "--suite", str(suite), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--jobs", "2", "--no-measure"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = [out / n / "seed0" for n in names]
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if all((r / "checkpoint.pt").exists() for r in runs):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    pids = [int((r / ".dropsplit.lock").read_text()) for r in runs]
    assert all(_alive(p) for p in pids) and proc.pid not in pids
    return proc, runs, pids


def _gone(pids, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


def test_sigterm_stops_a_parallel_suite_at_once_and_says_how_to_go_on(tmp_path):
    proc, runs, pids = _suite_workers(tmp_path, ["a", "b"])
    steps = [torch.load(r / "checkpoint.pt", weights_only=True)["progress"]["step"] for r in runs]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "the suite stopped: run the same command again to go on" in err
    assert _gone(pids, 10)
    for run, before in zip(runs, steps, strict=True):  # each ended with a checkpoint of its own
        assert torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["step"] >= before


def test_the_workers_of_a_killed_suite_end_with_it(tmp_path):
    proc, runs, pids = _suite_workers(tmp_path, ["a", "b"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone(pids, 60)  # once, they trained on (re-parented), then slept forever


def test_the_summary_records_the_commit_of_the_run_and_of_each_resume(tmp_path, monkeypatch):
    import dropsplit.training.trainer as tr

    config = tiny("train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=2")
    monkeypatch.setattr(tr, "_source", lambda: {"commit": "a" * 40, "dirty": False})
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "r", interrupt_at_step=4)
    monkeypatch.setattr(tr, "_source", lambda: {"commit": "b" * 40, "dirty": True})
    summary = train(config, tmp_path / "r", resume=True)
    assert summary["git"] == {"commit": "a" * 40, "dirty": False}
    assert summary["resumed"] == [{"step": 4, "commit": "b" * 40, "dirty": True}]
    monkeypatch.setattr(tr, "_source", lambda: {"commit": None, "dirty": None})
    assert train(config, tmp_path / "s")["git"] is None


def test_the_summary_records_the_numerics_version_of_the_code(tmp_path, monkeypatch):
    import dropsplit.training.trainer as tr

    # recorded inside a checkout and outside one (an installed copy: no commit)
    for commit in ("a" * 40, None):
        source = {"commit": commit, "dirty": None if commit is None else False}
        monkeypatch.setattr(tr, "source_commit", lambda source=source: source)
        summary = train(tiny("train.max_steps=2"), tmp_path / str(commit))
        assert summary["git"] == source | {"numerics": tr.NUMERICS}


def test_the_commit_is_that_of_this_checkout():
    from dropsplit.training.trainer import source_commit

    source_commit.cache_clear()  # a commit made since an earlier test asked (sessions commit)
    found = source_commit()
    if not (ROOT / ".git").exists():
        assert found is None
        return
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert found is not None and found["commit"] == head.stdout.strip()
    assert isinstance(found["dirty"], bool)
