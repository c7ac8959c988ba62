"""The output-directory checks (unwritable, full disk) and the fault hook's own tests.

Every test here runs the REAL entry points (``python -m ...``) in subprocesses, the way
a user does, and judges only what a user sees: the exit status, stderr's last line, and
what is left on disk. See docs/reliability.md for the table these tests back.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (PY, assert_no_trusted_run, assert_ok, assert_run_files_whole,
                           assert_same_weights, assert_user_error, env, last_line,
                           load_weights, make_archive, REPO, run, start, state_epoch,
                           wait_for_epoch)

# ====================================================================== tests
@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A real size-limited filesystem at ``folder`` (needs root + mount; skips otherwise)."""
    folder.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({m.stderr.strip()}); the in-process "
                    f"monkeypatch tests cover the logic")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_fault_hook_is_inert_unless_set(tmp_path, monkeypatch):
    """The kill-in-write hook must not fire for other files or other write counts."""
    from core import faults
    from core.atomic import atomic_write_json
    monkeypatch.setenv(faults.FAULT_ENV, "other.json@1")
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    monkeypatch.setenv(faults.FAULT_ENV, "x.json@5")
    faults._fault_writes.clear()
    atomic_write_json(tmp_path / "x.json", {"a": 2})  # 1st write of x.json: no fault
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp files left


def test_fault_hook_kills_mid_write_and_keeps_previous_file(tmp_path):
    """A SIGKILL half-way through writing leaves the previous file intact."""
    target = tmp_path / "model.safetensors"
    code = ("import numpy as np; from core.tensors import save_safetensors as s; import sys; "
            "s(sys.argv[1], {'w': np.arange(1000, dtype=np.float32)}); "
            "s(sys.argv[1], {'w': np.zeros(1000, dtype=np.float32)})")
    p = subprocess.run([PY, "-c", code, str(target)], cwd=REPO,
                       env=env(CIFAKE_FAULT_KILL_IN_WRITE="model.safetensors@2"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL
    np.testing.assert_array_equal(load_weights(target)["w"], np.arange(1000, dtype=np.float32))
    # the half-written temp file is there (the kill happened mid-write), never under the name
    assert any(f.name.startswith(".model.safetensors.") for f in tmp_path.iterdir())


@pytest.mark.parametrize("stack", ["numpy_mlp", "torch_cnn", "jax_port"])
def test_out_dir_under_a_regular_file_fails_before_training(tmp_path, stack):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    zp = make_archive(tmp_path / "tiny.zip")
    extra = ("--model", "mlp2") if stack == "jax_port" else ()
    p = run(f"{stack}.train", "--data", zp, "--cache-dir", tmp_path / "cache",
            "--out", blocker / "run", "--epochs", 1, "--no-progress", *extra)
    assert_user_error(p, str(blocker / "run"), "not writable")
    assert blocker.read_text() == "x"


def test_out_dir_on_a_full_disk_fails_before_training(tmp_path):
    """A real full filesystem: a 1 MiB tmpfs (needs root + mount); the in-process
    variant below covers machines where mounting is impossible."""
    with tmpfs(tmp_path / "tiny-fs", "1m") as mnt:
        zp = make_archive(tmp_path / "tiny.zip")
        p = run("numpy_mlp.train", "--data", zp, "--cache-dir", tmp_path / "cache",
                "--out", mnt / "run", "--epochs", 1, "--no-progress")
        assert_user_error(p, str(mnt / "run"), "MiB free")
        assert_no_trusted_run(mnt / "run")
        assert not (mnt / "run" / "state.json").exists()


def test_prepare_out_dir_refuses_a_nearly_full_disk_in_process(tmp_path, monkeypatch):
    from core import rundir
    from data.errors import UserError

    class Usage:  # what shutil.disk_usage returns, with 3 MiB free
        total, used, free = 2**30, 2**30 - 3 * 2**20, 3 * 2**20
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(UserError, match="only 3 MiB free"):
        rundir.prepare(tmp_path / "run", resume=False)
    rundir.unlock(tmp_path / "run")


def test_resume_refuses_a_state_json_that_is_not_json(tmp_path):
    from core import rundir
    from data.errors import UserError
    (tmp_path / "state.json").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="state.json: not valid JSON"):
        rundir.read_json(tmp_path / "state.json")


def test_classification_report_refuses_non_finite_logits():
    """Diverged weights give NaN/inf logits: one UserError, not a NaN in metrics.json
    (which strict JSON cannot even hold: that used to end in a ValueError traceback)."""
    from data.errors import UserError
    from core.metrics import classification_report
    labels = np.array([0, 1, 1])
    assert classification_report(np.array([-2.0, 3.0, 0.5]), labels)["accuracy"] == 100.0
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(UserError, match="1 non-finite logits .* out of 3: the model diverged"):
            classification_report(np.array([-2.0, bad, 0.5]), labels)


def test_save_safetensors_keeps_zero_dim_tensors(tmp_path):
    """BatchNorm's num_batches_tracked has shape (); np.ascontiguousarray would make it
    (1,), and the CNN loaders (which demand ()) would then refuse every v3 checkpoint."""
    from core.tensors import load_safetensors, save_safetensors
    path = tmp_path / "x.safetensors"
    t = {"n": np.array(7, np.int64), "w": np.arange(6, dtype=np.float32).reshape(2, 3).T}
    save_safetensors(path, t)
    got, _ = load_safetensors(path, {"n": ((), "int64"), "w": ((3, 2), "float32")})
    assert got["n"].shape == () and int(got["n"]) == 7
    np.testing.assert_array_equal(got["w"], t["w"])


def test_a_failed_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """ENOSPC at fsync (the disk filled up mid-run): UserError, old file intact, no temp."""
    import errno
    from core import atomic
    from data.errors import UserError
    atomic.atomic_write_json(tmp_path / "metrics.json", {"epoch": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(UserError, match=r"metrics.json \(No space left on device\).*--resume"):
        atomic.atomic_write_json(tmp_path / "metrics.json", {"epoch": 2})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_disk_filling_up_during_training_then_resume(tmp_path):
    """A real tmpfs (60 MiB; root + mount, else skipped) is filled to the last byte
    after epoch 1 of a running job: the next checkpoint write fails with one line, exit 2,
    the saved epoch stays loadable; after freeing space --resume finishes the run and
    equals an uninterrupted one bit for bit."""
    with tmpfs(tmp_path / "fs", "60m") as mnt:
        zp = make_archive(tmp_path / "tiny.zip", n_train=8, n_test=3)
        common = ["--data", zp, "--cache-dir", tmp_path / "cache", "--no-progress"]
        fresh = ["--epochs", 150, "--batch-size", 2, "--seed", 1]
        out = mnt / "run"
        p = start("numpy_mlp.train", *common, "--out", out, *fresh)
        assert wait_for_epoch(p, out, 1)
        filler = mnt / "filler"
        # fill the filesystem completely; unbuffered, so closing the file has nothing left
        # to flush (a buffered writer's close would raise the same ENOSPC again)
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 2**16)
            except OSError:
                pass
        p.wait(timeout=120)
        _, err = p.communicate()
        assert p.returncode == 2 and "Traceback" not in err, err[-2000:]
        assert "No space left on device" in last_line(err) and "--resume" in last_line(err)
        assert_run_files_whole(out)
        assert state_epoch(out) >= 1
        filler.unlink()
        assert_ok(run("numpy_mlp.train", "--cache-dir", tmp_path / "cache", "--no-progress",
                      "--out", out, "--resume"))
        ref = tmp_path / "ref"
        assert_ok(run("numpy_mlp.train", *common, "--out", ref, *fresh))
        assert_same_weights(out / "model.safetensors", ref / "model.safetensors")
