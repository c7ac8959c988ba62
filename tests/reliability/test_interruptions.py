"""Interruptions lose no work and leave nothing half-written.

Real training runs (subprocesses, tiny archive, several steps per epoch) are SIGKILLed at
several points (mid-epoch after >= 1 completed epoch, in the middle of each checkpoint
file's write via the test-only fault hook ``CIFAKE_FAULT_KILL_IN_WRITE`` in core/faults.py,
during the cache build of ``data.prepare``), stopped with SIGINT (Ctrl-C), and resumed.
After every kill each run file that exists must be whole (JSON parses, safetensors load);
the final weights must be bit-identical (CPU) to an uninterrupted run. A NaN/inf loss stops
the run naming epoch and step and keeps the last good checkpoint. An output directory that
cannot be written, a disk that is full or fills up during training, and a write that fails
are one line each, before training where they can be, and keep the previous files. Every
file the stacks write goes through the atomic helpers, and the temp file of a killed write is
removed by the next write of that file. A closed standard stream stops a command before it
runs; one that fails while results or errors are written is one line and a nonzero exit.

Every test runs the REAL entry points (``python -m ...``) the way a user does, and judges
only what a user sees: the exit status, stderr's last line, and what is left on disk.
See docs/reliability.md for the table these tests back.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (PY, REPO, assert_no_trusted_run, assert_ok, assert_run_files_whole,
                           assert_same_weights, assert_user_error, env, kill, last_line,
                           load_weights, make_archive, run, start, state_epoch, train_argv,
                           wait_for_epoch)

# Per stack: extra flags and the number of epochs (enough that a kill/Ctrl-C issued as
# soon as an epoch completes still lands inside the run). torch_cnn runs v3 (BatchNorm
# statistics, dropout, augmentation, Adam: every piece of state resume must restore);
# jax_port runs its MLP (a CNN costs ~10 s of compilation per process on this CPU).
STACKS = {
    "numpy_mlp": (("--lr", "0.05"), 30),
    "torch_cnn": (("--model", "v3", "--device", "cpu"), 6),
    "jax_port": (("--model", "mlp2", "--lr", "0.05"), 6),
}
BATCH = 2  # images per step: 8 steps per epoch on the 16-image training set


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupts")
    return {"zip": make_archive(d / "tiny.zip", n_train=8, n_test=3), "cache": d / "cache",
            "dir": d}


def _args(stack, archive, out, epochs=None, resume=False):
    """A fresh run's flags, or (resume) only what a user types to continue a run."""
    extra, n = STACKS[stack]
    if resume:
        return train_argv(archive["zip"], archive["cache"], out, "--resume",
                          *(["--epochs", epochs] if epochs else []))
    return train_argv(archive["zip"], archive["cache"], out, "--epochs", epochs or n,
                      "--batch-size", BATCH, "--seed", 3, *extra)


@pytest.fixture(scope="module")
def references(archive):
    """Uninterrupted runs, computed once per stack on first use."""
    cache = {}

    def get(stack):
        if stack not in cache:
            out = archive["dir"] / f"ref-{stack}"
            assert_ok(run(f"{stack}.train", *_args(stack, archive, out)))
            cache[stack] = out
        return cache[stack]
    return get


def _history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


def assert_matches_reference(out: Path, ref: Path, epochs: int) -> None:
    assert_same_weights(out / "model.safetensors", ref / "model.safetensors")
    m = json.loads((out / "metrics.json").read_text())
    assert m["complete"] is True
    h, rh = m["history"], _history(ref)
    assert [r["epoch"] for r in h] == list(range(1, epochs + 1))
    for a, b in zip(h, rh):  # the per-epoch numbers too, not only the end point
        assert a["train_loss"] == b["train_loss"] and a["train_acc"] == b["train_acc"], a["epoch"]


def _temp_files(out: Path) -> list[str]:
    return [f.name for f in out.iterdir() if f.name.startswith(".") and f.name.endswith(".tmp")]


# ------------------------------------------------------------------ the kill chain
# the checkpoint writes killed by the fault hook, per stack (each costs a process start:
# ~0.5 s for NumPy, ~5-10 s for torch/jax on the shared 2 cores)
WRITE_KILLS = {"numpy_mlp": ("model.safetensors", "state.safetensors"),
               "torch_cnn": ("model.safetensors",), "jax_port": ("state.safetensors",)}


@pytest.mark.parametrize("stack", [pytest.param(s, marks=pytest.mark.slow) if s != "numpy_mlp"
                                   else s for s in STACKS])
def test_kill_anywhere_then_resume_is_bit_identical(stack, archive, references, tmp_path):
    """One run, interrupted several ways in a row, each time resumed:
    1. SIGKILL as soon as epoch 1 is saved (lands mid-epoch 2 or later);
    2. SIGKILL half-way through writing a checkpoint (WRITE_KILLS);
    3. SIGINT (Ctrl-C) after the next epoch: exit 130, a message with the resume command;
    then the printed resume command runs to the end and must equal the uninterrupted
    run bit for bit (weights and per-epoch losses)."""
    ref = references(stack)
    epochs = STACKS[stack][1]
    out = tmp_path / "run"
    log = []

    # 1. hard kill mid-run
    p = start(f"{stack}.train", *_args(stack, archive, out))
    assert wait_for_epoch(p, out, 1), "run ended before it could be killed"
    rc, err = kill(p)
    assert rc == -signal.SIGKILL, err
    assert_run_files_whole(out)
    log.append(("SIGKILL mid-run", state_epoch(out)))

    # 2./3. hard kill inside a checkpoint write (the fault hook)
    for name in WRITE_KILLS[stack]:
        before = state_epoch(out)
        p = run(f"{stack}.train", *_args(stack, archive, out, resume=True),
                CIFAKE_FAULT_KILL_IN_WRITE=f"{name}@1")
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        assert any(t.startswith(f".{name}.") for t in _temp_files(out)), \
            "the kill did not happen inside the write"
        assert_run_files_whole(out)
        assert state_epoch(out) >= before
        log.append((f"SIGKILL in {name} write", state_epoch(out)))

    # 4. Ctrl-C
    before = state_epoch(out)
    assert before < epochs - 1, f"too few epochs left for the Ctrl-C step: {log}"
    p = start(f"{stack}.train", *_args(stack, archive, out, resume=True))
    assert wait_for_epoch(p, out, before + 1)
    rc, err = kill(p, signal.SIGINT)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert f"-m {stack}.train --out {out} --resume" in last_line(err), err[-2000:]
    assert_run_files_whole(out)
    assert json.loads((out / "state.json").read_text())["epoch_completed"] >= before + 1
    log.append(("SIGINT", state_epoch(out)))

    # the last resume completes
    p = run(f"{stack}.train", *_args(stack, archive, out, resume=True))
    assert_ok(p)
    assert_matches_reference(out, ref, epochs)
    print(f"{stack}: {log}")


@pytest.mark.parametrize("name", ["metrics.json", "state.json", "config.json"])
def test_numpy_kill_inside_each_json_write(name, archive, references, tmp_path):
    """The NumPy stack (fast) is also killed inside each JSON file's write."""
    ref = references("numpy_mlp")
    out = tmp_path / "run"
    nth = 1 if name == "config.json" else 2
    p = run("numpy_mlp.train", *_args("numpy_mlp", archive, out),
            CIFAKE_FAULT_KILL_IN_WRITE=f"{name}@{nth}")
    assert p.returncode == -signal.SIGKILL
    assert_run_files_whole(out)
    if name == "config.json":
        # killed before anything was trained: there is no run to resume, and --resume says so
        assert not (out / "config.json").exists() and not (out / "state.json").exists()
        assert_user_error(run("numpy_mlp.train", *_args("numpy_mlp", archive, out, resume=True)),
                          "no run to resume")
        assert_ok(run("numpy_mlp.train", *_args("numpy_mlp", archive, out)))
    else:
        assert_ok(run("numpy_mlp.train", *_args("numpy_mlp", archive, out, resume=True)))
    assert_matches_reference(out, ref, STACKS["numpy_mlp"][1])


def test_save_every_loses_only_the_epochs_since_the_last_save(archive, references, tmp_path):
    """--save-every 4: a kill inside the second save (epoch 8) leaves epoch 4 as the resume
    point and metrics.jsonl ahead of it; the resume (with another --save-every, which may
    change) trains epochs 5-30 again to the uninterrupted run's numbers, bit for bit."""
    ref = references("numpy_mlp")
    out = tmp_path / "run"
    p = run("numpy_mlp.train", *_args("numpy_mlp", archive, out), "--save-every", "4",
            CIFAKE_FAULT_KILL_IN_WRITE="metrics.json@2")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert_run_files_whole(out)
    assert state_epoch(out) == 4 and [r["epoch"] for r in _history(out)] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["save_every"] == 4
    p = run("numpy_mlp.train", *_args("numpy_mlp", archive, out, resume=True),
            "--save-every", "7")
    assert_ok(p)
    assert "resuming" in p.stderr and "after epoch 4" in p.stderr
    assert_matches_reference(out, ref, STACKS["numpy_mlp"][1])
    assert state_epoch(out) == STACKS["numpy_mlp"][1]  # the last epoch is always written
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, STACKS["numpy_mlp"][1] + 1))


# ------------------------------------------------------------------ cache build
def _is_trusted(folder: Path) -> bool:
    return (folder / "manifest.json").is_file() and ".tmp-" not in folder.name \
        and ".old-" not in folder.name


def test_kill_during_cache_build_leaves_nothing_trusted(tmp_path):
    zp = make_archive(tmp_path / "big.zip", n_train=1000, n_test=100)  # 2,200 images
    cache = tmp_path / "cache"
    p = start("data.prepare", "--data", zp, "--cache-dir", cache)
    t0 = time.time()
    while not (cache.exists() and any(".tmp-" in d.name for d in cache.iterdir())):
        assert p.poll() is None, "the build finished before it could be killed"
        assert time.time() - t0 < 120
        time.sleep(0.002)
    time.sleep(0.05)  # well inside the decoding
    rc, _ = kill(p)
    assert rc == -signal.SIGKILL
    assert not any(_is_trusted(d) for d in cache.iterdir()), "a killed build left a trusted cache"
    p = run("data.prepare", "--data", zp, "--cache-dir", cache, "--json")
    assert_ok(p)
    assert json.loads(p.stdout)["counts"]["train"] == {"FAKE": 1000, "REAL": 1000}
    assert not [d for d in cache.iterdir() if ".tmp-" in d.name], "the killed build's leftovers stay"
    # identical to a build that was never interrupted
    assert_ok(run("data.prepare", "--data", zp, "--cache-dir", tmp_path / "clean"))
    [a] = [d for d in cache.iterdir() if _is_trusted(d)]
    [b] = [d for d in (tmp_path / "clean").iterdir() if _is_trusted(d)]
    for f in ("train_images.npy", "test_images.npy", "train_labels.npy", "train_digests.npy"):
        np.testing.assert_array_equal(np.load(a / f, allow_pickle=False),
                                      np.load(b / f, allow_pickle=False))


def test_a_later_build_removes_a_killed_builds_temp_folder(tmp_path):
    """A dead build's temp folder (up to 400 MB on the full set) is cleaned by the next build."""
    zp = make_archive(tmp_path / "a.zip")
    cache = tmp_path / "cache"
    assert_ok(run("data.prepare", "--data", zp, "--cache-dir", cache))
    [key] = [d.name for d in cache.iterdir()]
    stale = cache / f"{key}.tmp-999999"  # what a killed build by process 999999 leaves
    stale.mkdir()
    (stale / "train_images.npy").write_bytes(b"\0" * 1000)
    (cache / key / "manifest.json").unlink()  # force a rebuild
    assert_ok(run("data.prepare", "--data", zp, "--cache-dir", cache))
    assert not stale.exists()


# ------------------------------------------------------------------ non-finite loss
# (stack, batch size): 2 = eight steps per epoch, the training loss overflows and names
# its step; "single" = one step per epoch (full batch), the step's loss is still finite
# and only the evaluation after it sees NaN/inf -- the path a full-batch user hits.
ABSURD_LR_CASES = [("numpy_mlp", "2"), ("numpy_mlp", "full"), ("torch_cnn", "2"),
                   ("jax_port", "64")]


@pytest.mark.parametrize("stack,batch", ABSURD_LR_CASES)
def test_absurd_lr_stops_with_a_clear_message(stack, batch, archive, tmp_path):
    """--lr 1e30: a real user mistake. The run stops with one line (exit 2, no
    traceback), nothing diverged is saved, and any checkpoint left is finite."""
    out = tmp_path / "run"
    p = run(f"{stack}.train", *_args(stack, archive, out, epochs=3), "--lr", "1e30",
            "--batch-size", batch)
    if batch == "2":
        assert_user_error(p, "non-finite", "epoch", "step", str(out), "lr")
    else:
        assert_user_error(p, "non-finite", "diverged", "--lr")
    if (out / "model.safetensors").exists():
        for k, v in load_weights(out / "model.safetensors").items():
            assert np.isfinite(v).all(), k
    assert not (out / "metrics.json").exists() or \
        json.loads((out / "metrics.json").read_text())["complete"] is False


@pytest.mark.parametrize("stack", ["numpy_mlp"])
def test_divergence_after_epoch_one_keeps_epoch_one(stack, archive, tmp_path):
    """Epoch 1 trains fine; the run then diverges (config.json's lr raised to 1e30 before
    --resume, standing in for an lr schedule gone wrong). model.safetensors must still
    hold epoch 1's weights, byte for byte."""
    out = tmp_path / "run"
    assert_ok(run(f"{stack}.train", *_args(stack, archive, out, epochs=1)))
    good = (out / "model.safetensors").read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    cfg["lr"] = 1e30
    (out / "config.json").write_text(json.dumps(cfg))
    p = run(f"{stack}.train", *_args(stack, archive, out, epochs=3, resume=True))
    assert_user_error(p, "non-finite", "epoch 2", "step")
    assert (out / "model.safetensors").read_bytes() == good
    assert state_epoch(out) == 1


# ------------------------------------------------------------------ every write is atomic
# Writers allowed to bypass core.atomic's helpers, and why.
ATOMIC_EXEMPT = {
    "core/atomic.py": "the atomic helpers themselves (temp + fsync + rename)",
    "core/faults.py": "the test-only fault hook writes half a temp file, then kills itself",
    "core/rundir.py": "the write probe of the run directory (deleted at once)",
    "data/cache.py": "writes only inside '<key>.tmp-PID/', fsynced, renamed into place whole",
    "bench/studies/launcher.py": "appends to a run's log file (a log, never read back as state)",
    "bench/speed/gpu.py": "a step's stdout/stderr log file (a log, never read back as state)",
}
_WRITE_FUNCS = {"save", "savez", "savez_compressed", "dump", "tofile", "write_text",
                "write_bytes", "savetxt"}


def non_atomic_writes(text: str, where: str) -> list[str]:
    """open(..., 'w'/'a'/'x'/'+') and np.save / json.dump / torch.save / Path.write_* calls."""
    found = []
    for node in ast.walk(ast.parse(text, where)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name in ("open", "fdopen"):
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and \
                    set(mode.value) & set("wax+"):
                found.append(f"{where}:{node.lineno}: open(..., {mode.value!r})")
        elif name in _WRITE_FUNCS and isinstance(f, ast.Attribute):
            owner = ast.unparse(f.value)
            if name == "save" and owner not in ("np", "numpy", "torch", "jnp"):
                continue  # e.g. checkpoint.save(...), which goes through save_safetensors
            if name == "dump" and owner not in ("json", "pickle", "yaml", "np"):
                continue
            found.append(f"{where}:{node.lineno}: {owner}.{name}(")
    return found


def test_every_file_the_stacks_write_goes_through_the_atomic_helpers():
    files = sorted(p for d in ("numpy_mlp", "torch_cnn", "jax_port", "data", "core", "bench", "cifake")
                   for p in (REPO / d).rglob("*.py"))
    bad = []
    for p in files:
        rel = p.relative_to(REPO).as_posix()
        if rel not in ATOMIC_EXEMPT:
            bad += non_atomic_writes(p.read_text(), rel)
    assert bad == [], "writes that bypass core.atomic.atomic_write_* / save_safetensors:\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("snippet", ["open(p, 'w').write(x)\n", "open(p, mode='ab')\n",
                                     "np.save(p, a)\n", "json.dump(o, f)\n", "torch.save(m, p)\n",
                                     "Path(p).write_text(s)\n", "a.tofile(p)\n"])
def test_atomic_scanner_catches_direct_writes(snippet):
    assert non_atomic_writes(snippet, "x.py"), snippet


# ------------------------------------------------------------------ full disks, failed writes, the fault hook
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


# ------------------------------------------------------------------ standard streams
def _predict_case(tmp_path: Path) -> tuple[Path, Path, Path]:
    from tests.helpers import image_bytes, mlp_run, synthetic_image
    run_dir = mlp_run(tmp_path / "run")
    good = tmp_path / "good.jpg"
    good.write_bytes(image_bytes(synthetic_image(1, 0)))
    return run_dir, good, tmp_path / "missing.jpg"


def _with_streams(module: str, *args, close: int | None = None, stdout=subprocess.PIPE,
                  cwd=None) -> subprocess.CompletedProcess:
    """``python -m module args`` with file descriptor ``close`` (1 or 2) closed, as the
    shell's ``>&-`` / ``2>&-`` leave it; the other stream captured."""
    from tests.helpers import cmd
    return subprocess.run(cmd(module, *args), cwd=cwd or REPO, env=env(), stdout=stdout,
                          stderr=subprocess.PIPE if close != 2 else None, timeout=120,
                          preexec_fn=(lambda: os.close(close)) if close else None)


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["text", "json"])
def test_closed_standard_output_is_an_error_not_a_silent_success(extra, tmp_path):
    """`predict >&-` printed its results into nothing and exited 0."""
    run_dir, good, _ = _predict_case(tmp_path)
    p = _with_streams("numpy_mlp.predict", "--run", run_dir, *extra, good, close=1,
                      stdout=None)
    assert p.returncode == 2 and "Traceback" not in p.stderr.decode(), p.stderr
    assert last_line(p.stderr.decode()).startswith("error:")
    assert "standard output is closed" in last_line(p.stderr.decode())


def test_closed_standard_error_never_puts_errors_among_the_results(tmp_path):
    """`predict 2>&-` wrote its error lines to standard output, among the scores."""
    run_dir, good, missing = _predict_case(tmp_path)
    p = _with_streams("numpy_mlp.predict", "--run", run_dir, good, missing, close=2)
    assert p.returncode != 0
    assert b"error:" not in p.stdout and b"missing.jpg" not in p.stdout, p.stdout


def test_closed_standard_error_stops_training_before_it_starts(tmp_path):
    """Training's progress and errors go to standard error; with it closed they went to
    standard output. Nothing is run, no run folder is made."""
    zp = make_archive(tmp_path / "tiny.zip")
    out = tmp_path / "run"
    p = _with_streams("numpy_mlp.train", *train_argv(zp, tmp_path / "cache", out, "--epochs",
                                                     "1"), close=2)
    assert p.returncode == 2 and p.stdout == b"", p.stdout
    assert not out.exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_standard_output_after_writing_output_file_is_one_line(tmp_path):
    """The summary printed after `--output` raised an OSError traceback on a full disk."""
    run_dir, good, _ = _predict_case(tmp_path)
    out = tmp_path / "scores.csv"
    with open("/dev/full", "w") as full:
        p = _with_streams("numpy_mlp.predict", "--run", run_dir, good, "--output", out,
                          stdout=full)
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err, err
    assert last_line(err).startswith("error:") and "No space left" in last_line(err)
    assert len(out.read_text().splitlines()) == 2  # the rows themselves were written whole


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_failing_standard_error_is_a_nonzero_exit_without_traceback(tmp_path):
    run_dir, good, missing = _predict_case(tmp_path)
    from tests.helpers import cmd
    with open("/dev/full", "w") as full:
        p = subprocess.run(cmd("numpy_mlp.predict", "--run", run_dir, good, missing),
                           cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=full,
                           timeout=120)
    assert p.returncode == 2 and b"error:" not in p.stdout, p.stdout


# ------------------------------------------------------------------ predict --output
def test_a_killed_predict_output_leaves_no_temp_file_for_long(tmp_path):
    """`predict --output` killed mid-way (kill -9) left its .scores.csv.*.tmp forever. The
    next write of the same file removes it; a live writer's temp file, and files that are
    not ours, are kept."""
    run_dir, good, _ = _predict_case(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    good.rename(photos / "good.jpg")
    out = tmp_path / "scores.csv"
    p = start("numpy_mlp.predict", "--run", run_dir, "--batch-size", "1", "--output", out,
              *[photos] * 2000)
    t0 = time.time()
    while not _temp_files(tmp_path):
        assert p.poll() is None, "predict ended before it could be killed"
        assert time.time() - t0 < 60
        time.sleep(0.002)
    rc, _ = kill(p)
    assert rc == -signal.SIGKILL and not out.exists()
    (left,) = _temp_files(tmp_path)
    foreign = tmp_path / ".scores.csv.editor.tmp"
    foreign.write_text("not ours")
    assert_ok(run("numpy_mlp.predict", "--run", run_dir, photos, "--output", out))
    assert _temp_files(tmp_path) == [foreign.name]
    assert left.startswith(".scores.csv.cifake-")
    assert len(out.read_text().splitlines()) == 2
    from core.atomic import _locked_temp, remove_stale_temps
    fd, live = _locked_temp(out)  # a writer at work: its lock is held
    try:
        remove_stale_temps(out)
        assert os.path.exists(live)
    finally:
        os.close(fd)
    remove_stale_temps(out)
    assert not os.path.exists(live) and foreign.exists()
