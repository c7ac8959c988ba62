"""The run driver (core.driver) through each stack's ``train``: configuration, the resume
rule, the run directory's lock, and the reading of run files. Each case here trained the
wrong thing (or hung, or printed a traceback) before the driver existed."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from data.errors import UserError
from tests.helpers import (PY, REPO, assert_same_weights, assert_user_error, env, kill,
                           make_archive, run, start, train_argv, wait_for_epoch)

STACKS = ("numpy_mlp", "torch_cnn", "jax_port")
MODEL = {"numpy_mlp": "mlp2", "torch_cnn": "baseline", "jax_port": "mlp2"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("driver")
    return {"zip": make_archive(d / "a.zip", n_train=4, n_test=2),
            "other": make_archive(d / "b.zip", n_train=5, n_test=2), "cache": d / "cache"}


def main_of(stack):
    return importlib.import_module(f"{stack}.train").main


def train(stack, data, out, *extra):
    """Run ``stack``'s train in this process -> (exit code, the one error line or None)."""
    argv = train_argv(data["zip"], data["cache"], out, *extra,
                      fresh=("--model", MODEL[stack], "--epochs", "1", "--batch-size", "4"))
    try:
        return main_of(stack)(argv), None
    except UserError as e:
        return 2, str(e)


def files(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


# ------------------------------------------------------------------ configuration
def test_an_abbreviated_flag_is_refused(data, tmp_path):
    """``--batch full`` used to be taken for --batch-size and ignored (preset batch)."""
    code, err = train("numpy_mlp", data, tmp_path / "r", "--batch", "full")
    assert code == 2 and "unrecognized arguments: --batch" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stack,model", [("torch_cnn", "baseline"), ("jax_port", "v3")])
def test_full_batch_is_refused_where_it_does_not_apply(stack, model, data, tmp_path):
    """torch_cnn used to accept ``--batch-size full`` and train at 64."""
    code, err = train(stack, data, tmp_path / "r", "--model", model, "--batch-size", "full")
    assert code == 2 and "--batch-size full applies to the MLP models only" in err


def test_full_batch_is_a_real_value(data, tmp_path):
    """``--batch-size full`` overrides a mini-batch preset (None = full in config.json)."""
    code, err = train("numpy_mlp", data, tmp_path / "r", "--preset", "mlp2-mini",
                      "--batch-size", "full", "--epochs", "1")
    assert code == 0, err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["batch_size"] is None and cfg["hidden"] == [12] and cfg["lr"] == 0.0075


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("seed,ok", [("-1", False), (str(2**32), False), ("1.5", False),
                                     (str(2**32 - 1), True)])
def test_seeds_outside_32_bits_are_one_line_errors(stack, seed, ok, data, tmp_path):
    """``--seed -1`` used to be a traceback deep in NumPy's SeedSequence."""
    if ok:
        from core.config import build_parser, explicit_flags
        stk = {"numpy_mlp": "NumpyMLP", "torch_cnn": "TorchCNN", "jax_port": "JaxPort"}[stack]
        stack_obj = getattr(importlib.import_module(f"{stack}.train"), stk)()
        assert explicit_flags(build_parser(stack_obj), ["--seed", seed])["seed"] == 2**32 - 1
        return
    code, err = train(stack, data, tmp_path / "r", "--seed", seed)
    assert code == 2 and "--seed" in err and seed in err
    assert not (tmp_path / "r").exists()


def test_seed_minus_one_through_the_real_entry_point(data, tmp_path):
    p = run("numpy_mlp.train", *train_argv(data["zip"], data["cache"], tmp_path / "r"),
            "--seed", "-1")
    assert_user_error(p, "--seed", "-1")


# ------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One finished 1-epoch run per stack, copied by the tests that change it."""
    d = tmp_path_factory.mktemp("runs")
    out = {}
    for stack in STACKS:
        code, err = train(stack, data, d / stack)
        assert code == 0, err
        out[stack] = d / stack
    return out


def copy_run(src, dst):
    dst.mkdir()
    for name, b in files(src).items():
        (dst / name).write_bytes(b)
    return dst


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("flag", [("--data", "other"), ("--preset", None), ("--lr", "0.5"),
                                  ("--seed", "0")])
def test_resume_refuses_everything_but_epochs_cache_and_device(stack, flag, data, runs, tmp_path):
    """torch_cnn and jax_port used to train the next epoch on ``--data OTHER.zip``; torch
    ignored ``--preset`` and rewrote config.json before refusing."""
    out = copy_run(runs[stack], tmp_path / "r")
    before = files(out)
    name, value = flag
    value = {"other": str(data["other"]), None: "v3" if stack != "numpy_mlp" else "mlp4-mini"} \
        .get(value, value)
    code, err = train(stack, data, out, "--resume", "--epochs", "2", name, value)
    assert code == 2 and f"{name} cannot be given with it" in err, err
    assert files(out) == before


@pytest.mark.parametrize("stack,other", [("numpy_mlp", "jax_port"), ("jax_port", "numpy_mlp"),
                                         ("torch_cnn", "jax_port"), ("jax_port", "torch_cnn")])
def test_resume_refuses_a_run_of_another_stack(stack, other, data, runs, tmp_path):
    """A run of another stack used to be a traceback, or (torch) have its config rewritten."""
    out = copy_run(runs[other], tmp_path / "r")
    before = files(out)
    code, err = train(stack, data, out, "--resume", "--epochs", "2")
    assert code == 2 and f"a run of '{other}', not of {stack}" in err, err
    assert files(out) == before


def test_resume_derives_what_the_stack_derives(data, runs, tmp_path):
    """layer_dims follows from model and hidden: a config.json without it resumes (it was a
    KeyError), with the derived value written back."""
    out = copy_run(runs["numpy_mlp"], tmp_path / "r")
    cfg = json.loads((out / "config.json").read_text())
    dims = cfg.pop("layer_dims")
    (out / "config.json").write_text(json.dumps(cfg))
    assert train("numpy_mlp", data, out, "--resume", "--epochs", "2") == (0, None)
    assert json.loads((out / "config.json").read_text())["layer_dims"] == dims


def test_resume_refuses_a_dataset_whose_images_changed(tmp_path):
    """Same path, same counts, one image replaced: the resume used to train on, silently;
    it is refused, naming the data, with nothing written. The fingerprint follows the
    pixels: the same images as a zip and as its extracted folder give the same one."""
    from data.cache import content_fingerprint, load_cifake
    from tests.helpers import extract_to, image_bytes, synthetic_image
    z = make_archive(tmp_path / "a.zip", n_train=4, n_test=2)
    folder = extract_to(z, tmp_path / "folder")
    data = {"zip": folder, "cache": tmp_path / "cache"}
    out = tmp_path / "r"
    assert train("numpy_mlp", data, out) == (0, None)
    fp = json.loads((out / "config.json").read_text())["data_fingerprint"]
    assert fp == content_fingerprint(load_cifake(z, tmp_path / "cache", verbose=False).manifest)
    victim = next((folder / "train" / "REAL").iterdir())
    victim.write_bytes(image_bytes(synthetic_image(0, 999)))  # same name, other pixels
    before = files(out)
    code, err = train("numpy_mlp", data, out, "--resume", "--epochs", "2")
    assert code == 2 and "changed since the run started" in err and str(folder) in err, err
    assert files(out) == before


@pytest.mark.parametrize("name,change,needle", [
    ("config.json", lambda c: c.update(seed="zero"), "--seed must be an integer"),
    ("config.json", lambda c: c.update(epochs=[1]), "--epochs must be an integer"),
    ("config.json", lambda c: c.pop("lr"), "'lr' missing"),
    ("config.json", lambda c: c.update(hidden=[5, 5]), "hidden layer"),
    # a key of the stack's own flags (these were KeyError tracebacks)
    ("config.json", lambda c: c.pop("dtype"), "'dtype' missing"),
    ("config.json", lambda c: c.pop("decay"), "'decay' missing"),
    ("metrics.json", lambda m: m.update(history="all"), "'history' has the wrong type"),
    ("metrics.json", lambda m: m["history"][0].update(epoch="1"), "positive integer 'epoch'"),
    ("state.json", lambda s: s.update(wall_seconds="long"), "'wall_seconds' has the wrong type"),
])
def test_resume_refuses_run_files_of_the_wrong_types(name, change, needle, data, runs, tmp_path):
    out = copy_run(runs["numpy_mlp"], tmp_path / "r")
    obj = json.loads((out / name).read_text())
    change(obj)
    (out / name).write_text(json.dumps(obj))
    before = files(out)
    code, err = train("numpy_mlp", data, out, "--resume", "--epochs", "2")
    assert code == 2 and name in err and needle in err, err
    assert files(out) == before


@pytest.mark.parametrize("stack", ["numpy_mlp", "jax_port"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_special_file_in_place_of_a_run_file_neither_hangs_nor_tracebacks(
        stack, kind, data, runs, tmp_path):
    out = copy_run(runs[stack], tmp_path / "r")
    for name in ("config.json", "metrics.json"):
        victim = out / name
        saved = victim.read_bytes()
        victim.unlink()
        if kind == "fifo":
            os.mkfifo(victim)
        else:
            victim.symlink_to("/dev/zero")
        p = run(f"{stack}.train", *train_argv(data["zip"], data["cache"], out, "--resume",
                                              "--epochs", "2"), timeout=120)
        assert_user_error(p, name, "not a regular file")
        victim.unlink()
        victim.write_bytes(saved)


# ------------------------------------------------------------------ the run directory
def test_a_second_training_on_the_same_folder_is_refused_naming_the_first(data, tmp_path):
    """Two trainings into one --out used to both exit 0, leaving one's config.json with the
    other's weights."""
    out = tmp_path / "r"
    argv = train_argv(data["zip"], data["cache"], out, fresh=("--epochs", "400",
                                                              "--batch-size", "1"))
    first = start("numpy_mlp.train", *argv)
    try:
        assert wait_for_epoch(first, out, 1)
        for second in (argv, train_argv(data["zip"], data["cache"], out, "--resume")):
            p = run("numpy_mlp.train", *second)
            assert_user_error(p, str(out.resolve()), f"pid {first.pid}")
    finally:
        kill(first)


def test_a_folder_with_only_config_json_is_a_run(data, runs, tmp_path):
    """A run killed before its first epoch holds only config.json: a fresh run into it is
    refused, and --resume starts it from epoch 0 with its own configuration."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_bytes((runs["numpy_mlp"] / "config.json").read_bytes())
    code, err = train("numpy_mlp", data, out)
    assert code == 2 and "already holds a run" in err
    code, err = train("numpy_mlp", data, out, "--resume")
    assert code == 0, err
    assert_same_weights(out / "model.safetensors", runs["numpy_mlp"] / "model.safetensors")


def test_a_fresh_run_needs_an_empty_folder(data, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = train("numpy_mlp", data, out)
    assert code == 2 and "is not empty (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_sigterm_saves_the_last_epoch_and_prints_the_resume_command(data, tmp_path):
    import signal
    out = tmp_path / "r"
    p = start("numpy_mlp.train", *train_argv(data["zip"], data["cache"], out,
                                             fresh=("--epochs", "400", "--batch-size", "1")))
    assert wait_for_epoch(p, out, 1)
    rc, err = kill(p, signal.SIGTERM)
    assert rc == 130 and "Traceback" not in err
    assert f"python -m numpy_mlp.train --out {out} --resume" in err.strip().splitlines()[-1]


def test_the_driver_owns_config_resume_and_lock_once():
    """Each stack's main is a few lines; none parses flags or touches the run directory."""
    import ast
    for stack in STACKS:
        src = (REPO / stack / "train.py").read_text()
        tree = ast.parse(src)
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        assert main.end_lineno - main.lineno + 1 < 60, stack
        for word in ("add_argument(\"--resume\"", "prepare(", "flock", "KeyboardInterrupt",
                     "atomic_write_json(", "read_json("):
            assert word not in src, (stack, word)


def test_module_entry_points_run(tmp_path):
    for stack in STACKS:
        p = subprocess.run([PY, "-m", f"{stack}.train", "--help"], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "--resume" in p.stdout and "--batch " not in p.stdout, \
            p.stderr
    assert sys.executable


@pytest.mark.parametrize("stack", STACKS)
def test_metrics_jsonl_holds_one_line_per_epoch_also_after_a_resume(stack, data, tmp_path):
    out = tmp_path / "r"
    assert train(stack, data, out) == (0, None)
    # a line of an epoch whose state was never saved (a kill between the two writes)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "half')
    assert train(stack, data, out, "--resume", "--epochs", "3") == (0, None)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and lines == history


def test_one_device_vocabulary():
    from core import flags
    assert [flags.device(v) for v in ("auto", "CPU", "gpu", "cuda", "CUDA", "cuda:0", "cpu:0")] \
        == ["auto", "cpu", "gpu", "gpu", "gpu", "gpu", "cpu"]
    for bad in ("tpu", "gpu:banana", "gpu:", "auto:0"):
        with pytest.raises(UserError, match="choose auto, cpu or gpu"):
            flags.device(bad)
    # every command uses the first device of its kind: another index is refused, not ignored
    with pytest.raises(UserError, match="index is not supported.*CUDA_VISIBLE_DEVICES=1"):
        flags.device("cuda:1")
    with pytest.raises(UserError, match="index is not supported"):
        flags.device("cpu:2")


@pytest.mark.parametrize("stack,needle", [("numpy_mlp", "CPU only"), ("torch_cnn", "CUDA is not available"),
                                          ("jax_port", "JAX sees no GPU")])
def test_device_gpu_without_a_gpu_is_one_line(stack, needle, data, tmp_path):
    import jax
    import torch
    if torch.cuda.is_available() or jax.default_backend() != "cpu":
        pytest.skip("a GPU is present")
    code, err = train(stack, data, tmp_path / "r", "--device", "cuda")
    assert code == 2 and needle in err, err


@pytest.mark.parametrize("stack", STACKS)
def test_device_cpu_trains_and_is_recorded(stack, data, tmp_path):
    assert train(stack, data, tmp_path / "r", "--device", "cpu") == (0, None)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["device"].startswith("cpu")


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TFRecord event files in ``folder``."""
    import struct

    from tensorboardX.proto import event_pb2
    out: dict[str, list] = {}
    for f in sorted(folder.iterdir()):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


@pytest.mark.parametrize("stack", STACKS)
def test_tensorboard_scalars_follow_the_history(stack, data, tmp_path):
    from tests.helpers import require_modules
    require_modules("tensorboardX", extra="tensorboard")
    out = tmp_path / "r"
    assert train(stack, data, out, "--tensorboard", "--epochs", "2") == (0, None)
    history = json.loads((out / "metrics.json").read_text())["history"]
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train_loss"]] == [1, 2]
    for (step, v), row in zip(scalars["test_acc"], history):
        assert step == row["epoch"] and v == pytest.approx(row["test_acc"], rel=1e-6)
