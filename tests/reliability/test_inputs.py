"""Bad and odd inputs: every kind of broken file or value a user can hand the tool, and the
inputs that used to crash, hang, eat memory or give silently wrong answers, each with the
behaviour that replaced it (docs/reliability.md). Everything is generated in tmp_path
(never committed) and fed to the REAL entry points (``python -m data.prepare``,
``<stack>.train``, ``<stack>.predict``) in subprocesses where what the user sees is the
point, in-process where the check is about one function's output or memory.

For every failure case the test asserts: nonzero exit, stderr's last line starts with
``error:`` and names the file or value, no ``Traceback``, and nothing a later run would
trust is left behind (no cache folder with a manifest.json, no metrics.json /
model.safetensors in --out, a resumed run's files unchanged). The "success" cases (RGBA,
grayscale, palette, 16-bit images, EXIF orientation) must load, converted as a viewer
would.

Speed: data-layer cases go through ``data.prepare`` and the NumPy stack (fast imports);
a representative few go through torch_cnn / jax_port (each subprocess pays seconds of
torch/jax import).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.cache as cache_mod
from core.atomic import atomic_write_bytes
from core.predict import DetectorBase
from core.rundir import RUN_FORMAT, read_json
from data import load_cifake
from data.errors import DataError, UserError
from data.images import PREDICT_BATCH, load_image_for_model
from tests.helpers import (NOBODY, REPO, assert_no_trusted_run, assert_ok, assert_user_error,
                           can_drop_privileges, cmd, env, extract_to, image_bytes, last_line,
                           make_archive, mlp_run, png_bomb, require, run, synthetic_image,
                           train_argv, trusted_caches, world_tmpdir)


# ------------------------------------------------------------------ crafted bytes
def jpeg(label=1, i=0, size=32) -> bytes:
    return image_bytes(synthetic_image(label, i, size))


def truncated_jpeg() -> bytes:
    b = jpeg(1, 99)
    return b[: len(b) // 2]


NOT_AN_IMAGE = b"<html><body>404 Not Found</body></html>\n" * 4


def rgba_png() -> bytes:
    rgba = np.dstack([synthetic_image(1, 98), np.full((32, 32), 128, np.uint8)])
    return image_bytes(rgba, "PNG")


def gray_png() -> bytes:
    return image_bytes(synthetic_image(1, 97), "PNG", mode="L")


def palette_png() -> bytes:
    return image_bytes(synthetic_image(1, 96), "PNG", mode="P")


def tiny_png() -> bytes:
    return image_bytes(np.full((1, 1, 3), 200, np.uint8), "PNG")


# ------------------------------------------------------------------ data-layer corpus
# name -> (build(tmp) -> data path, None for a failure | expected train/REAL count,
#          words the error line must contain)
BAD = "train/REAL/bad.jpg"


def _zip_with(member: str, data: bytes):
    return lambda d: make_archive(d / "a.zip", extra={member: data})


def _truncated_zip(d: Path) -> Path:
    good = make_archive(d / "full.zip").read_bytes()
    p = d / "a.zip"
    p.write_bytes(good[: int(len(good) * 0.6)])  # the central directory is gone
    return p


def _empty_class(d: Path) -> Path:
    p = make_archive(d / "a.zip", drop=("test/FAKE/",))
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("test/FAKE/", b"")  # the folder is there, with nothing in it
    return p


def _dir_as_file(d: Path) -> Path:
    root = extract_to(make_archive(d / "a.zip"), d / "tree")
    (root / "train" / "REAL" / "folder.jpg").mkdir()
    return root


def _not_a_zip(d: Path) -> Path:
    p = d / "cifake.zip"
    p.write_bytes(NOT_AN_IMAGE)
    return p


DATA_CASES = {
    "truncated_jpeg": (_zip_with(BAD, truncated_jpeg()), None, [BAD, "truncated"]),
    "not_an_image": (_zip_with(BAD, NOT_AN_IMAGE), None, [BAD, "not a readable image"]),
    "rgba_png_converted": (_zip_with("train/REAL/rgba.png", rgba_png()), 7, []),
    "grayscale_converted": (_zip_with("train/REAL/gray.png", gray_png()), 7, []),
    "palette_converted": (_zip_with("train/REAL/pal.png", palette_png()), 7, []),
    "image_64x64": (_zip_with(BAD, jpeg(1, 5, size=64)), None, [BAD, "64x64"]),
    "image_1x1": (_zip_with("train/REAL/dot.png", tiny_png()), None, ["train/REAL/dot.png", "1x1"]),
    "decompression_bomb": (_zip_with("train/REAL/bomb.png", png_bomb()), None,
                           ["train/REAL/bomb.png", "decompression bomb"]),
    "empty_class_folder": (_empty_class, None, ["test/FAKE", "no images"]),
    "missing_test_split": (lambda d: make_archive(d / "a.zip", drop=("test/",)), None,
                           ["a.zip", "missing split folder 'test/'"]),
    "truncated_zip": (_truncated_zip, None, ["a.zip", "zip"]),
    "zip_slip_dotdot": (_zip_with("train/REAL/../../../evil.jpg", jpeg()), None,
                        ["evil.jpg", "'..'"]),
    "zip_absolute_path": (_zip_with("/etc/evil.jpg", jpeg()), None, ["/etc/evil.jpg", "absolute"]),
    "directory_where_file_expected": (_dir_as_file, None, ["folder.jpg", "sub-folder"]),
    "not_a_zip_file": (_not_a_zip, None, ["cifake.zip", "not a zip"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_prepare_bad_dataset(case, tmp_path):
    build, n_real, needles = DATA_CASES[case]
    data = build(tmp_path)
    cache = tmp_path / "cache"
    p = run("data.prepare", "--data", data, "--cache-dir", cache, "--json")
    if n_real is None:
        assert_user_error(p, *needles)
        assert trusted_caches(cache) == [], f"{case}: a failed build left a loadable cache"
    else:
        assert_ok(p)
        assert json.loads(p.stdout)["counts"]["train"]["REAL"] == n_real
        [folder] = trusted_caches(cache)
        imgs = np.load(folder / "train_images.npy", allow_pickle=False)
        assert imgs.shape[1:] == (32, 32, 3) and imgs.dtype == np.uint8  # converted to RGB
    # archive members are decoded in memory, never extracted
    stray = [f for f in tmp_path.rglob("*") if f.suffix in (".jpg", ".png")
             and "tree" not in f.parts]
    assert stray == []


def test_data_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "cifake.zip"
    p = run("numpy_mlp.train", "--data", missing, "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "run", "--epochs", 1, "--no-progress")
    assert_user_error(p, str(missing), "does not exist")
    assert not (tmp_path / "run").exists()
    assert trusted_caches(tmp_path / "cache") == []


def test_a_bad_image_stops_training_before_any_run_is_written(tmp_path):
    zp = make_archive(tmp_path / "a.zip", extra={BAD: truncated_jpeg()})
    out = tmp_path / "run"
    p = run("numpy_mlp.train", "--data", zp, "--cache-dir", tmp_path / "cache", "--out", out,
            "--epochs", 1, "--no-progress")
    assert_user_error(p, BAD)
    assert_no_trusted_run(out)
    assert trusted_caches(tmp_path / "cache") == []


def test_unreadable_file_in_dataset_folder():
    """chmod 000 stops no one when tests run as root (CI): the child runs as 'nobody'."""
    if not can_drop_privileges():
        pytest.skip("cannot run a child as an unprivileged user (need root + setpriv)")
    d = world_tmpdir()
    try:
        root = extract_to(make_archive(d / "a.zip"), d / "tree")
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = root / "train" / "REAL" / "0.jpg"
        locked.chmod(0)
        cache = d / "cache"
        cache.mkdir(mode=0o777)
        cache.chmod(0o777)
        p = run("data.prepare", "--data", root, "--cache-dir", cache, user=NOBODY, cwd="/")
        assert_user_error(p, str(locked), "Permission denied")
        assert trusted_caches(cache) == []
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ training flags
@pytest.mark.parametrize("flags,needle", [
    (("--lr", "-0.1"), "--lr"),
    (("--lr", "0"), "--lr"),
    (("--lr", "nan"), "--lr"),
    (("--batch-size", "0"), "--batch-size"),
    (("--epochs", "0"), "--epochs"),
    (("--epochs", "many"), "'many'"),
    (("--decay", "-1"), "--decay"),
    (("--subset", "-3"), "--subset"),
    (("--hidden", "0"), "--hidden"),
    (("--preset", "mlp9-full"), "mlp9-full"),
])
def test_numpy_train_nonsensical_numbers(flags, needle, tmp_path):
    out = tmp_path / "run"
    p = run("numpy_mlp.train", "--data", tmp_path / "never-read.zip", "--out", out,
            "--no-progress", *flags)
    assert_user_error(p, needle)
    assert_no_trusted_run(out)


@pytest.mark.parametrize("stack,flags,needle", [
    ("torch_cnn", ("--batch-size", "0"), "--batch-size"),
    ("torch_cnn", ("--model", "resnet"), "resnet"),
    ("jax_port", ("--model", "mlp2", "--epochs", "0"), "--epochs"),
])
def test_other_stacks_nonsensical_numbers(stack, flags, needle, tmp_path):
    out = tmp_path / "run"
    p = run(f"{stack}.train", "--data", tmp_path / "never-read.zip", "--out", out,
            "--no-progress", *flags)
    assert_user_error(p, needle)
    assert_no_trusted_run(out)


@pytest.mark.parametrize("name", ["run\nnext", "run\tx", "run\rx"])
def test_control_characters_in_out_are_refused(name, tmp_path):
    """A newline in --out split the training's last line (the run's result and where it
    is) and the printed resume command in two. Refused before anything runs, for the
    bench commands' --out too."""
    from bench.files import out_dir
    out = tmp_path / name
    p = run("numpy_mlp.train", "--data", tmp_path / "never-read.zip", "--out", out,
            "--no-progress")
    line = assert_user_error(p, "--out", "control characters")
    assert len(p.stderr.strip().splitlines()) == 1 and repr(name)[1:-1] in line
    with pytest.raises(UserError, match="--out must not contain control characters"):
        out_dir(tmp_path / "bench" / name)
    assert not out.exists() and not (tmp_path / "bench").exists()


# ------------------------------------------------------------------ runs to break
def _train(stack: str, out: Path, data: Path, cache: Path, *extra) -> None:
    p = run(f"{stack}.train", "--data", data, "--cache-dir", cache, "--out", out,
            "--epochs", 2, "--batch-size", 4, "--no-progress", *extra)
    assert_ok(p)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One tiny archive, one finished 2-epoch NumPy MLP run, and user images."""
    d = tmp_path_factory.mktemp("corpus")
    zp = make_archive(d / "tiny.zip")
    _train("numpy_mlp", d / "mlp-run", zp, d / "cache")
    imgs = d / "images"
    imgs.mkdir()
    files = {"good.jpg": jpeg(0, 3), "truncated.jpg": truncated_jpeg(), "html.jpg": NOT_AN_IMAGE,
             "bomb.png": png_bomb(), "rgba.png": rgba_png(), "gray.png": gray_png(),
             "palette.png": palette_png(), "dot.png": tiny_png(),
             "big.jpg": jpeg(1, 4, size=64)}
    for name, b in files.items():
        (imgs / name).write_bytes(b)
    (imgs / "a-folder.jpg").mkdir()
    return {"dir": d, "zip": zp, "cache": d / "cache", "mlp_run": d / "mlp-run", "images": imgs}


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _digests(run_dir: Path) -> dict[str, str]:
    """Every file of the run but its lock (which names the pid of whoever last held it)."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(run_dir.iterdir()) if f.is_file() and f.name != ".lock"}


# ------------------------------------------------------------------ predict: images
def test_predict_scores_good_images_and_names_each_bad_one(corpus):
    imgs = corpus["images"]
    good = ["good.jpg", "rgba.png", "gray.png", "palette.png", "dot.png", "big.jpg"]
    bad = {"truncated.jpg": "truncated", "html.jpg": "not a readable image",
           "bomb.png": "decompression bomb", "a-folder.jpg": "folder holds no image file",
           "missing.jpg": "cannot read"}
    args = [imgs / n for n in good[:3]] + [imgs / n for n in bad] + [imgs / n for n in good[3:]]
    p = run("numpy_mlp.predict", "--run", corpus["mlp_run"], "--json", *args)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    doc = json.loads(p.stdout)
    assert [r["path"] for r in doc] == [str(a) for a in args]  # every input, in order
    results = {Path(r["path"]).name: r for r in doc if r["error"] is None}
    assert sorted(results) == sorted(good)  # every good image scored despite the bad ones
    for r in results.values():
        assert 0.0 <= r["p_fake"] <= 1.0 and r["label"] in ("FAKE", "REAL")
    for r in doc:
        if r["error"] is not None:  # a failed input is in the output too, with its reason
            assert r["p_fake"] is None and bad[Path(r["path"]).name] in r["error"]
    assert results["dot.png"]["resized"] and results["dot.png"]["original_size"] == [1, 1]
    assert results["big.jpg"]["resized"] and results["big.jpg"]["original_size"] == [64, 64]
    assert not results["rgba.png"]["resized"]
    err_lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == len(bad), p.stderr
    for name, why in bad.items():
        assert any(name in ln and why in ln for ln in err_lines), (name, why, err_lines)
    assert last_line(p.stderr).startswith("error:")


def test_predict_unreadable_image_as_unprivileged_user(corpus):
    if not can_drop_privileges():
        pytest.skip("cannot run a child as an unprivileged user (need root + setpriv)")
    d = world_tmpdir()
    try:
        run_dir = _copy_run(corpus["mlp_run"], d / "run")
        for f in [run_dir, *run_dir.iterdir()]:
            f.chmod(0o755 if f.is_dir() else 0o644)
        locked = d / "locked.jpg"
        locked.write_bytes(jpeg())
        locked.chmod(0)
        p = run("numpy_mlp.predict", "--run", run_dir, locked, user=NOBODY, cwd="/")
        line = assert_user_error(p, str(locked), "Permission denied", rc=1)
        assert line.startswith("error:")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ predict: run dirs
def _write_mlp_ckpt(path: Path, tensors: dict, layer_dims=(3072, 7, 1), family="mlp"):
    from core.tensors import save_safetensors
    save_safetensors(path, tensors, {"family": family, "model": "mlp2",
                            "layer_dims": json.dumps(list(layer_dims))})


def _mlp_tensors(dims=(3072, 7, 1), dtype=np.float32) -> dict:
    t = {}
    for l in range(1, len(dims)):
        t[f"W{l}"] = np.zeros((dims[l], dims[l - 1]), dtype)
        t[f"b{l}"] = np.zeros((dims[l], 1), dtype)
    return t


def _cnn_tensors() -> dict:
    shapes = {"conv1.weight": (32, 3, 3, 3), "conv1.bias": (32,), "conv2.weight": (64, 32, 3, 3),
              "conv2.bias": (64,), "fc1.weight": (512, 4096), "fc1.bias": (512,),
              "fc2.weight": (1, 512), "fc2.bias": (1,)}
    return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


def _break_wrong_shape(r: Path):
    t = _mlp_tensors()
    t["W1"] = np.zeros((7, 100), np.float32)
    _write_mlp_ckpt(r / "model.safetensors", t)
    return ["W1", "(7, 100)"]


def _break_extra_tensor(r: Path):
    t = _mlp_tensors()
    t["W9"] = np.zeros((1, 1), np.float32)
    _write_mlp_ckpt(r / "model.safetensors", t)
    return ["W9"]


def _break_missing_tensor(r: Path):
    t = _mlp_tensors()
    del t["b2"]
    _write_mlp_ckpt(r / "model.safetensors", t)
    return ["b2"]


def _break_wrong_dtype(r: Path):
    _write_mlp_ckpt(r / "model.safetensors", _mlp_tensors(dtype=np.int32))
    return ["int32"]


def _break_corrupt(r: Path):
    b = (r / "model.safetensors").read_bytes()
    (r / "model.safetensors").write_bytes(b[: len(b) // 2])  # a truncated download
    return ["model.safetensors", "not a valid .safetensors"]


def _break_random_bytes(r: Path):
    (r / "model.safetensors").write_bytes(os.urandom(4096))
    return ["model.safetensors"]


def _break_other_family(r: Path):
    from core.tensors import save_safetensors
    save_safetensors(r / "model.safetensors", _cnn_tensors(), {"family": "cnn", "model": "baseline"})
    cfg = json.loads((r / "config.json").read_text())
    cfg.update(stack="torch_cnn", model="baseline")
    (r / "config.json").write_text(json.dumps(cfg))
    return ["model.safetensors", "cnn"]


def _break_config_not_json(r: Path):
    (r / "config.json").write_text("{'model': 'mlp2',")  # a hand edit gone wrong
    return ["config.json", "not valid JSON"]


def _break_no_model(r: Path):
    (r / "model.safetensors").unlink()
    return ["model.safetensors"]


def _break_config_layer_dims(value):
    def brk(r: Path):
        cfg = json.loads((r / "config.json").read_text())
        cfg["layer_dims"] = value
        (r / "config.json").write_text(json.dumps(cfg))
        return ["config.json", "layer_dims", repr(value)]
    return brk


def _break_nested_metadata(r: Path):
    """100,000 nested brackets in the checkpoint's layer_dims: json.loads recursed too deep."""
    from core.tensors import save_safetensors
    save_safetensors(r / "model.safetensors", _mlp_tensors(),
                     {"family": "mlp", "model": "mlp2",
                      "layer_dims": "[" * 100_000 + "]" * 100_000})
    return ["model.safetensors", "layer_dims"]


def _break_checkpoint_fifo(r: Path):
    """A named pipe in the checkpoint's place: opening it would block; it was 'not found'."""
    (r / "model.safetensors").unlink()
    os.mkfifo(r / "model.safetensors")
    return ["model.safetensors", "not a regular file"]


def _break_checkpoint_device(r: Path):
    (r / "model.safetensors").unlink()
    (r / "model.safetensors").symlink_to("/dev/zero")
    return ["model.safetensors", "not a regular file"]


PREDICT_RUN_CASES = {
    "config_layer_dims_number": _break_config_layer_dims(5),
    "config_layer_dims_null": _break_config_layer_dims(None),
    "checkpoint_metadata_nested_100k": _break_nested_metadata,
    "checkpoint_is_a_fifo": _break_checkpoint_fifo,
    "checkpoint_links_to_a_device": _break_checkpoint_device,
    "checkpoint_wrong_shape": _break_wrong_shape,
    "checkpoint_extra_tensor": _break_extra_tensor,
    "checkpoint_missing_tensor": _break_missing_tensor,
    "checkpoint_wrong_dtype": _break_wrong_dtype,
    "checkpoint_truncated": _break_corrupt,
    "checkpoint_random_bytes": _break_random_bytes,
    "checkpoint_of_another_family": _break_other_family,
    "config_not_json": _break_config_not_json,
    "checkpoint_missing": _break_no_model,
}


@pytest.mark.parametrize("case", sorted(PREDICT_RUN_CASES))
def test_numpy_predict_refuses_a_broken_run(case, corpus, tmp_path):
    r = _copy_run(corpus["mlp_run"], tmp_path / "run")
    needles = PREDICT_RUN_CASES[case](r)
    p = run("numpy_mlp.predict", "--run", r, corpus["images"] / "good.jpg")
    assert_user_error(p, *needles)
    assert p.stdout.strip() == ""  # nothing scored with a model that was not loaded


def test_numpy_predict_refuses_config_that_disagrees_with_weights(corpus, tmp_path):
    """config.json says mlp4 (3072-20-7-5-1), the weights are an mlp2: refuse, don't guess."""
    r = _copy_run(corpus["mlp_run"], tmp_path / "run")
    cfg = json.loads((r / "config.json").read_text())
    cfg.update(model="mlp4", hidden=[20, 7, 5], layer_dims=[3072, 20, 7, 5, 1])
    (r / "config.json").write_text(json.dumps(cfg))
    p = run("numpy_mlp.predict", "--run", r, corpus["images"] / "good.jpg")
    assert_user_error(p, "mlp")


def test_predict_run_dir_that_does_not_exist(corpus, tmp_path):
    p = run("numpy_mlp.predict", "--run", tmp_path / "no-run", corpus["images"] / "good.jpg")
    assert_user_error(p, str(tmp_path / "no-run"))


@pytest.mark.parametrize("stack", ["jax_port", "torch_cnn"])
def test_cnn_predict_refuses_an_mlp_run(stack, corpus, tmp_path):
    """predict --run pointed at a run of the other family (or, for JAX, a corrupt one)."""
    r = _copy_run(corpus["mlp_run"], tmp_path / "run")
    if stack == "torch_cnn":  # the torch CNN predictor gets an MLP run
        p = run(f"{stack}.predict", "--run", r, corpus["images"] / "good.jpg")
        assert_user_error(p, "mlp2")
    else:  # the JAX predictor (both families) gets an MLP run with a truncated checkpoint
        _break_corrupt(r)
        p = run(f"{stack}.predict", "--run", r, corpus["images"] / "good.jpg")
        assert_user_error(p, "model.safetensors", "not a valid .safetensors")


# ------------------------------------------------------------------ resume of a damaged run
def _resume(stack: str, r: Path, corpus, *extra):
    return run(f"{stack}.train", *train_argv(corpus["zip"], corpus["cache"], r, "--resume",
                                    "--epochs", 3, *extra))


RESUME_CASES = {
    "metrics_json_not_json": ("metrics.json", b"{\"history\": [", ["metrics.json", "not valid JSON"]),
    "state_json_not_json": ("state.json", b"\x00\x01\x02", ["state.json", "not valid JSON"]),
    "config_json_not_json": ("config.json", b"", ["config.json", "not valid JSON"]),
    "state_safetensors_truncated": ("state.safetensors", None, ["state.safetensors"]),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_numpy_resume_refuses_a_damaged_run(case, corpus, tmp_path):
    r = _copy_run(corpus["mlp_run"], tmp_path / "run")
    # make it resumable-but-unfinished: --epochs 3 on a 2-epoch run extends it
    name, data, needles = RESUME_CASES[case]
    if data is None:
        b = (r / name).read_bytes()
        data = b[: len(b) // 3]
    (r / name).write_bytes(data)
    before = _digests(r)
    p = _resume("numpy_mlp", r, corpus)
    assert_user_error(p, *needles)
    assert _digests(r) == before, "a refused resume modified the run"


def test_numpy_resume_refuses_state_with_wrong_shape(corpus, tmp_path):
    r = _copy_run(corpus["mlp_run"], tmp_path / "run")
    t = _mlp_tensors()
    t["W1"] = np.zeros((7, 3000), np.float32)
    _write_mlp_ckpt(r / "state.safetensors", t)
    before = _digests(r)
    p = _resume("numpy_mlp", r, corpus)
    assert_user_error(p, "state.safetensors", "W1")
    assert _digests(r) == before


@pytest.fixture(scope="module")
def torch_run(corpus):
    out = corpus["dir"] / "torch-run"
    _train("torch_cnn", out, corpus["zip"], corpus["cache"], "--device", "cpu")
    return out


def test_torch_resume_refuses_state_with_wrong_shape(corpus, torch_run, tmp_path):
    """A state.safetensors whose fc1.weight has the wrong shape: one line naming it."""
    from safetensors.numpy import load_file
    from core.tensors import save_safetensors
    r = _copy_run(torch_run, tmp_path / "run")
    t = load_file(str(r / "state.safetensors"))
    from safetensors import safe_open
    with safe_open(str(r / "state.safetensors"), "numpy") as f:
        meta = f.metadata()
    t["model.fc1.weight"] = np.zeros((512, 100), np.float32)
    save_safetensors(r / "state.safetensors", t, meta)
    before = _digests(r)
    p = _resume("torch_cnn", r, corpus, "--device", "cpu")
    assert_user_error(p, "fc1.weight")
    after = _digests(r)
    for f in ("model.safetensors", "state.safetensors", "state.json", "metrics.json"):
        assert after[f] == before[f], f"a refused resume modified {f}"


def test_torch_resume_refuses_metrics_not_json(corpus, torch_run, tmp_path):
    r = _copy_run(torch_run, tmp_path / "run")
    (r / "metrics.json").write_text("nan")
    p = _resume("torch_cnn", r, corpus, "--device", "cpu")
    assert_user_error(p, "metrics.json")
    assert_ok_files = json.loads((r / "state.json").read_text())
    assert assert_ok_files["epoch_completed"] == 2


def test_jax_resume_refuses_state_json_not_json(corpus, tmp_path):
    d = tmp_path / "jax-run"
    _train("jax_port", d, corpus["zip"], corpus["cache"], "--model", "mlp2")
    (d / "state.json").write_text("{not json")
    before = _digests(d)
    p = _resume("jax_port", d, corpus)
    assert_user_error(p, "state.json", "not valid JSON")
    assert _digests(d) == before


# ------------------------------------------------------------------ special files: no hang
def _limit_memory():  # the child may use at most 3 GiB of address space
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_predict_neither_hangs_nor_eats_memory_on_special_files(kind, corpus, tmp_path):
    """A named pipe would block open() forever; /dev/zero would be read until memory
    runs out. Both must get an error line naming the file (exit 1), the good image
    still scored. The child is time- and memory-limited so a failure cannot hurt the
    machine."""
    import subprocess
    from tests.helpers import cmd, env
    if kind == "fifo":
        special = tmp_path / "pipe.jpg"
        os.mkfifo(special)
    else:
        special = Path("/dev/zero")
        if not special.exists():
            pytest.skip("no /dev/zero")
    good = corpus["images"] / "good.jpg"
    try:
        p = subprocess.run(cmd("numpy_mlp.predict", "--run", corpus["mlp_run"], special, good),
                           cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=20,
                           preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"predict hung on {special}")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert str(special) in p.stderr and str(good) in p.stdout


_RSS_PROBE = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], "
              "capture_output=True, text=True); sys.stderr.write(p.stderr); "
              "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def test_zip_bomb_member_is_refused_without_inflating_it(tmp_path):
    """A 256 MiB run of zeros deflates to ~250 KB: as a class-folder member it is a zip
    bomb (a 32x32 image is a few KB). It must be refused from its declared size, and
    the decoding process must never hold it in memory (peak RSS of the child measured)."""
    import subprocess
    import sys
    from tests.helpers import cmd, env
    zp = make_archive(tmp_path / "a.zip")
    with zipfile.ZipFile(zp, "a", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("train/REAL/huge.jpg", "w", force_zip64=True) as f:
            block = b"\0" * 2**20
            for _ in range(256):
                f.write(block)
    assert zp.stat().st_size < 2 * 2**20
    p = subprocess.run([sys.executable, "-c", _RSS_PROBE,
                        *cmd("data.prepare", "--data", zp, "--cache-dir", tmp_path / "c")],
                       env=env(), capture_output=True, text=True, timeout=120,
                       preexec_fn=_limit_memory)
    rc, peak_kib = map(int, p.stdout.split())
    assert rc == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "huge.jpg" in last_line(p.stderr)
    assert peak_kib < 200 * 1024, f"the child peaked at {peak_kib / 1024:.0f} MiB"


# ------------------------------------------------------------------ second round: helpers
def png16_gray(values: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG, written by hand (Pillow reads but rarely writes them)."""
    h, w = values.shape
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF")
    return buf.getvalue()


def good_jpeg(path: Path) -> Path:
    path.write_bytes(image_bytes(synthetic_image(1, 0)))
    return path


# ------------------------------------------------------------------ predict: pixel values
def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    v = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    p = tmp_path / "g16.png"
    p.write_bytes(png16_gray(v))
    arr, resized, size = load_image_for_model(str(p))
    want = np.rint(v / 257.0).astype(np.uint8)
    assert arr.shape == (32, 32, 3) and not resized
    assert np.abs(arr[..., 0].astype(int) - want).max() <= 1
    assert (arr == 255).mean() < 0.01  # Pillow's convert("RGB") made 99.6% of them 255
    # the dataset decoder shares the policy
    from data.images import decode_dataset_image
    assert np.array_equal(decode_dataset_image(png16_gray(v), "x"), arr)


@pytest.mark.parametrize("maxval", [65535, 4095])
def test_16bit_pgm_is_scaled_not_refused(maxval, tmp_path):
    """A PGM with maxval > 255 opens as Pillow's 32-bit mode "I" (scaled to 0..65535); it
    was refused as a '32-bit integer image' with no white level."""
    v = (np.arange(32 * 32).reshape(32, 32) * maxval // 1023).astype(np.uint16)  # 0..maxval
    p = tmp_path / "g16.pgm"
    p.write_bytes(b"P5\n32 32\n%d\n" % maxval + v.astype(">u2").tobytes())
    arr, _, _ = load_image_for_model(str(p))
    want = np.rint(v / maxval * 255).astype(np.uint8)
    assert np.abs(arr[..., 0].astype(int) - want).max() <= 1


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    v = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    p = tmp_path / "f.tif"
    p.write_bytes(tiff(v))
    arr, _, _ = load_image_for_model(str(p))
    assert np.array_equal(arr[..., 0], np.rint(v.astype(np.float64) * 255).astype(np.uint8))


@pytest.mark.parametrize("kind,needle", [
    ("float_out_of_range", "32-bit float image with values outside [0, 1]"),
    ("float_nan", "32-bit float image"),
    ("int32", "32-bit integer image")])
def test_tiffs_without_a_white_level_are_refused_naming_the_file(kind, needle, tmp_path):
    v = {"float_out_of_range": np.full((32, 32), 200.0, np.float32),
         "float_nan": np.full((32, 32), np.nan, np.float32),
         "int32": (np.arange(1024).reshape(32, 32) * 4_000_000).astype(np.int32)}[kind]
    p = tmp_path / f"{kind}.tif"
    p.write_bytes(tiff(v))
    with pytest.raises(DataError, match=rf"^{p}: .*{needle.replace('[', '.').replace(']', '.')}"):
        load_image_for_model(str(p))


def test_exif_orientation_is_applied(tmp_path):
    """A 'phone photo': pixels stored landscape, EXIF orientation 6 (rotate 90 degrees
    clockwise to display). It is scored as displayed: portrait, top half bright."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = 255            # left half bright as stored = top half once rotated
    im = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    im.save(p, "JPEG", exif=exif.tobytes(), quality=95)
    arr, resized, size = load_image_for_model(str(p))
    assert size == (32, 64)         # width x height as a viewer shows it
    assert arr[:8].mean() > 200 and arr[-8:].mean() < 50


def test_predict_cli_scores_16bit_png_and_names_the_refused_tiff(tmp_path):
    r = mlp_run(tmp_path / "run")
    g16 = tmp_path / "g16.png"
    g16.write_bytes(png16_gray(np.full((32, 32), 30000, np.uint16)))
    i32 = tmp_path / "i32.tif"
    i32.write_bytes(tiff(np.full((32, 32), 7, np.int32)))
    p = run("numpy_mlp.predict", "--run", r, "--json", g16, i32, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert [Path(x["path"]).name for x in json.loads(p.stdout) if x["error"] is None] == \
        ["g16.png"]
    line = last_line(p.stderr)
    assert line.startswith(f"error: {i32}: 32-bit integer image"), line


# ------------------------------------------------------------------ predict: model output
def test_predict_refuses_nan_weights_with_one_line(tmp_path):
    r = mlp_run(tmp_path / "run", nan=True)
    img = good_jpeg(tmp_path / "a.jpg")
    for extra in ([], ["--json"]):
        p = run("numpy_mlp.predict", "--run", r, *extra, img, cwd=tmp_path)
        assert_user_error(p, "model.safetensors", "W1", "non-finite")
        assert "nan" not in p.stdout.lower()


class _Stub(DetectorBase):
    """A detector whose scores are given: the shared loop's checks without a model."""

    def __init__(self, p_fake_batch):
        super().__init__("stub", {}, "cpu")
        self.p_fake_batch = p_fake_batch


def test_a_non_finite_score_is_an_error_record_and_json_stays_valid(tmp_path, capsys):
    from core.predict import _print
    imgs = [str(good_jpeg(tmp_path / f"{i}.jpg")) for i in range(3)]
    det = _Stub(lambda b: np.array([0.25, np.nan, np.inf])[:len(b)])
    rc = _print(det.predict_iter(imgs), as_json=True)
    out, err = capsys.readouterr()
    assert rc == 1
    doc = json.loads(out)  # strict JSON: a bare NaN would not parse
    assert [d["path"] for d in doc] == imgs
    assert [d["p_fake"] for d in doc] == [0.25, None, None]
    assert all("not a probability" in d["error"] for d in doc[1:])
    assert err.count("error:") == 2 and "not a probability" in err


def test_predict_scores_in_bounded_batches(tmp_path):
    """Memory must not grow with the number of images: the model sees at most
    PREDICT_BATCH images at once (torch_cnn.predict used to score all in one pass)."""
    img = str(good_jpeg(tmp_path / "a.jpg"))
    n = 2 * PREDICT_BATCH + 5
    seen = []
    det = _Stub(lambda b: (seen.append(len(b)), np.full(len(b), 0.5))[1])
    assert len(det.predict([img] * n)) == n
    assert max(seen) <= PREDICT_BATCH and sum(seen) == n


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_the_bytes_of_one_image_are_one_input_whatever_their_type(kind, tmp_path):
    """Detector.predict(memoryview(data)) iterated the view: one record per byte."""
    from numpy_mlp.predict import Detector
    det = Detector.load(mlp_run(tmp_path / "run"))
    (rec,) = det.predict(kind(jpeg(1, 5)))
    assert rec["error"] is None and rec["label"] in ("FAKE", "REAL")


def test_torch_predict_scores_many_images(tmp_path):
    """The CNN entry point through the shared batched loop, end to end (600 files)."""
    require("torch")
    from torch_cnn import checkpoint
    from torch_cnn.model import build_model
    import torch
    torch.manual_seed(0)
    r = tmp_path / "run"
    r.mkdir()
    checkpoint.save(r / "model.safetensors", build_model("baseline"), "baseline")
    (r / "config.json").write_text(json.dumps({"run_format": RUN_FORMAT, "model": "baseline", "family": "cnn"}))
    img = good_jpeg(tmp_path / "a.jpg")
    p = run("torch_cnn.predict", "--run", r, *[img] * 600, cwd=tmp_path)
    assert_ok(p)
    assert len(p.stdout.splitlines()) == 600


def test_a_folder_scan_picks_up_every_format_the_decoder_reads(tmp_path):
    """.jfif, .jpe and .avif files decoded when named but a folder scan skipped them
    silently (the scan had its own list of eight extensions); it now takes the decoder's."""
    from PIL import features
    r = mlp_run(tmp_path / "run")
    d = tmp_path / "photos"
    d.mkdir()
    names = ["a.jfif", "b.JPE"]
    for name in names:
        (d / name).write_bytes(jpeg(1, 6))
    if features.check("avif"):
        (d / "c.avif").write_bytes(image_bytes(synthetic_image(0, 6), "AVIF"))
        names.append("c.avif")
    (d / "notes.txt").write_text("not an image")
    p = run("numpy_mlp.predict", "--run", r, "--json", d, cwd=tmp_path)
    assert_ok(p)
    assert [Path(x["path"]).name for x in json.loads(p.stdout)] == names
    from data.images import decodable_extensions
    scanned = set(decodable_extensions())
    assert {".jpg", ".png", ".webp", ".gif", ".tif", ".bmp"} <= scanned
    assert not {".txt", ".pdf", ".mpg", ".h5"} & scanned
    assert (".avif" in scanned) == features.check("avif")


# ------------------------------------------------------------------ one-line errors
def test_a_newline_in_a_file_name_keeps_every_message_on_one_line(tmp_path):
    r = mlp_run(tmp_path / "run")
    bad = tmp_path / "evil\nname.jpg"
    bad.write_bytes(b"not an image")
    good = good_jpeg(tmp_path / "good\nphoto.jpg")
    p = run("numpy_mlp.predict", "--run", r, bad, good, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: {tmp_path}/evil\\nname.jpg: not a readable image (no image format recognised)"]
    assert len(p.stdout.strip().splitlines()) == 1 and "good\\nphoto.jpg" in p.stdout
    # and through run_cli (any UserError)
    p = run("data.prepare", "--data", tmp_path / "no\nsuch.zip", cwd=tmp_path)
    assert_user_error(p, "no\\nsuch.zip")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


# ------------------------------------------------------------------ zip archives
def test_duplicate_member_names_are_refused(tmp_path):
    zp = make_archive(tmp_path / "a.zip")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns, then writes the duplicate anyway
        with zipfile.ZipFile(zp, "a") as z:
            for i in range(2):
                z.writestr("train/REAL/0.jpg", image_bytes(synthetic_image(0, 50 + i)))
    p = run("data.prepare", "--data", zp, "--cache-dir", tmp_path / "c", cwd=tmp_path)
    assert_user_error(p, str(zp), "'train/REAL/0.jpg' more than once")


def _lying_member(zp: Path, name: str, method: int, real_size: int, declared: int) -> None:
    """Add ``name`` holding ``real_size`` zero bytes compressed with ``method``, then patch
    the local header and the central directory to declare ``declared`` bytes."""
    with zipfile.ZipFile(zp, "a", compression=method) as z:
        with z.open(name, "w") as f:
            block = b"\0" * 2**20
            for _ in range(real_size // 2**20):
                f.write(block)
        info = z.getinfo(name)
    b = bytearray(zp.read_bytes())
    assert b[info.header_offset:info.header_offset + 4] == b"PK\x03\x04"
    struct.pack_into("<I", b, info.header_offset + 22, declared)
    i = b.find(b"PK\x01\x02")  # central directory entries: the name follows 46 bytes
    while i != -1:
        if b[i + 46:i + 46 + len(name)] == name.encode():
            struct.pack_into("<I", b, i + 24, declared)
            break
        i = b.find(b"PK\x01\x02", i + 4)
    else:
        raise AssertionError("central directory entry not found")
    zp.write_bytes(bytes(b))


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_members_are_size_capped_too(method, tmp_path):
    """A member declaring 2,000 bytes that inflates to 48 MiB: zipfile.read inflated all
    of it (a 1.5 GiB one ran out of memory). It must be refused with at most a few KB
    decompressed (traced Python allocations, in this process)."""
    zp = make_archive(tmp_path / "a.zip")
    _lying_member(zp, "train/REAL/liar.jpg", method, 48 * 2**20, 2000)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"liar\.jpg.*(CRC or size mismatch|corrupt)"):
            load_cifake(zp, tmp_path / "c", verbose=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated while reading"


def _central_records(b: bytes) -> tuple[int, list[bytearray], int]:
    """(offset of the central directory, its records, offset of the end record) of a zip
    without an archive comment."""
    eocd = b.rfind(b"PK\x05\x06")
    size, off = struct.unpack("<II", b[eocd + 12:eocd + 20])
    recs, i = [], off
    while i < off + size:
        n, e, c = struct.unpack("<HHH", b[i + 28:i + 34])
        recs.append(bytearray(b[i:i + 46 + n + e + c]))
        i += 46 + n + e + c
    return off, recs, eocd


def _with_central(b: bytes, recs: list[bytearray]) -> bytes:
    off, _, eocd = _central_records(b)
    cd = b"".join(recs)
    end = bytearray(b[eocd:eocd + 22])
    struct.pack_into("<HHII", end, 8, len(recs), len(recs), len(cd), off)
    return b[:off] + cd + bytes(end)


def _renamed(rec: bytearray, name: str) -> bytearray:
    n = struct.unpack("<H", rec[28:30])[0]
    out = rec[:46] + name.encode() + rec[46 + n:]
    struct.pack_into("<H", out, 28, len(name.encode()))
    return out


def _aliased(zp: Path) -> None:
    """200 more names in the central directory for the bytes of train/REAL/0.jpg."""
    b = zp.read_bytes()
    _, recs, _ = _central_records(b)
    (rec,) = [r for r in recs if r[46:].startswith(b"train/REAL/0.jpg")]
    zp.write_bytes(_with_central(b, recs + [_renamed(rec, f"train/REAL/alias{k}.jpg")
                                            for k in range(200)]))


def _hidden_inside_another(zp: Path) -> None:
    """A member whose local header and data lie inside another member's data (stored, so
    they are there verbatim): the 'quoted overlap' of non-recursive zip bombs."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("train/REAL/hidden.jpg", jpeg(1, 77))
    inner = inner.getvalue()
    _, (rec,), _ = _central_records(inner)
    carrier = "notes/carrier.bin"
    with zipfile.ZipFile(zp, "a") as z:
        z.writestr(carrier, inner[:30 + len("train/REAL/hidden.jpg") + len(jpeg(1, 77))])
        start = z.getinfo(carrier).header_offset + 30 + len(carrier)
    struct.pack_into("<I", rec, 42, start)
    b = zp.read_bytes()
    _, recs, _ = _central_records(b)
    zp.write_bytes(_with_central(b, recs + [rec]))


def _local_name_differs(zp: Path) -> None:
    """train/REAL/0.jpg's local header names it train/REAL/0.png (the same length)."""
    b = bytearray(zp.read_bytes())
    with zipfile.ZipFile(zp) as z:
        at = z.getinfo("train/REAL/0.jpg").header_offset + 30
    assert b[at:at + 16] == b"train/REAL/0.jpg"
    b[at:at + 16] = b"train/REAL/0.png"
    zp.write_bytes(bytes(b))


@pytest.mark.parametrize("craft,needle", [
    (_aliased, "'train/REAL/0.jpg' overlaps 'train/REAL/alias0.jpg'"),
    (_hidden_inside_another, "'notes/carrier.bin' overlaps 'train/REAL/hidden.jpg'"),
    (_local_name_differs, "'train/REAL/0.jpg': its local header names it 'train/REAL/0.png'")],
    ids=["aliased_names", "member_inside_another", "local_name_differs"])
def test_overlapping_or_renamed_zip_members_are_refused(craft, needle, tmp_path):
    """Several central-directory names for one member's bytes made a 7 MB archive decompress
    for hours, one copy per name, every copy accepted as an image; a member whose local
    header carries another name was read without a look at it. Each is refused naming the
    member; the overlaps from the directory alone, before anything is decompressed."""
    zp = make_archive(tmp_path / "a.zip")
    craft(zp)
    with pytest.raises(DataError) as e:
        load_cifake(zp, tmp_path / "c", verbose=False)
    assert needle in str(e.value) and str(zp) in str(e.value)
    assert "\n" not in str(e.value)
    assert not trusted_caches(tmp_path / "c")


# ------------------------------------------------------------------ decoded cache
def _cache_folder(cache: Path) -> Path:
    (target,) = [d for d in cache.iterdir() if d.is_dir()]
    return target


@pytest.mark.parametrize("edit", ["zeroed_images", "flipped_labels", "manifest_counts"])
def test_an_edited_cache_is_refused(edit, tiny_zip, tmp_path):
    cache = tmp_path / "c"
    load_cifake(tiny_zip, cache, verbose=False)
    t = _cache_folder(cache)
    if edit == "zeroed_images":
        a = np.load(t / "train_images.npy")
        np.save(t / "train_images.npy", np.zeros_like(a))
        needle = "train_images.npy"
    elif edit == "flipped_labels":
        a = np.load(t / "test_labels.npy")
        np.save(t / "test_labels.npy", (1 - a).astype(np.uint8))
        needle = "test_labels.npy"
    else:
        m = json.loads((t / "manifest.json").read_text())
        m["counts"]["train"]["REAL"] += 1
        (t / "manifest.json").write_text(json.dumps(m))
        needle = "manifest.json"
    with pytest.raises(DataError, match=rf"{needle}.*(damaged or edited)"):
        load_cifake(tiny_zip, cache, verbose=False)
    p = run("numpy_mlp.train", "--data", tiny_zip, "--cache-dir", cache, "--out", tmp_path / "r",
            "--epochs", 1, "--no-progress", cwd=tmp_path)
    assert_user_error(p, needle, "damaged or edited")


def test_a_deeply_nested_cache_manifest_is_rebuilt_not_a_traceback(tiny_zip, tmp_path):
    """A manifest.json of 100,000 nested brackets raised RecursionError from json.load; it
    is a damaged cache like any manifest that is not JSON: rebuilt."""
    cache = tmp_path / "c"
    load_cifake(tiny_zip, cache, verbose=False)
    (_cache_folder(cache) / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    ds = load_cifake(tiny_zip, cache, verbose=False)
    assert len(ds.train) == 12 and json.loads((_cache_folder(cache) / "manifest.json").read_text())


def test_a_full_disk_during_the_cache_build_is_one_line(tiny_zip, tmp_path, monkeypatch):
    calls = []
    real = cache_mod._write_npy

    def full(path, arr):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, arr)
    monkeypatch.setattr(cache_mod, "_write_npy", full)
    cache = tmp_path / "c"
    with pytest.raises(DataError, match=r"cannot write the cache in .*No space left on device.*"
                                        r"--cache-dir"):
        load_cifake(tiny_zip, cache, verbose=False)
    assert [p.name for p in cache.iterdir()] == []  # no temp folder, no lock file


_SLOW_BUILD = (
    "import sys, time, data.cache as c\n"
    "real = c.decode_dataset_image\n"
    "n = [0]\n"
    "def slow(raw, where):\n"
    "    n[0] += 1\n"
    "    if n[0] == 2:\n"
    "        print('decoding', flush=True); time.sleep(3)\n"
    "    return real(raw, where)\n"
    "c.decode_dataset_image = slow\n"
    "ds = c.load_cifake(sys.argv[1], cache_dir=sys.argv[2])\n"
    "print(len(ds.train), flush=True)\n")


def test_concurrent_builders_wait_for_each_other(tiny_zip, tmp_path):
    """The second data.prepare, started while the first is building, waits, then finds the
    cache ready: it never builds over the first one (which made the first fail with
    'unreadable cache file' while it read a folder being replaced)."""
    cache = tmp_path / "c"
    first = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(tiny_zip), str(cache)],
                             cwd=REPO, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "decoding"
        second = run("data.prepare", "--data", tiny_zip, "--cache-dir", cache, "--json",
                     cwd=tmp_path)
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and out.strip() == "12", err
    assert_ok(second)
    assert "waiting for another process" in second.stderr
    assert "building CIFAKE cache" not in second.stderr, second.stderr
    assert json.loads(second.stdout)["counts"]["train"] == {"FAKE": 6, "REAL": 6}
    assert [p.name for p in cache.iterdir()] == [_cache_folder(cache).name]


def test_test_split_inside_train_is_refused_before_training(tmp_path):
    zp = make_archive(tmp_path / "a.zip", n_train=6, n_test=3)
    with zipfile.ZipFile(zp) as z:
        members = {n: z.read(n) for n in z.namelist()}
    for n in list(members):
        if n.startswith("test/"):
            members[n] = members["train/" + n[len("test/"):]]  # 0..2 exist in train too
    with zipfile.ZipFile(zp, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    out = tmp_path / "run"
    p = run("numpy_mlp.train", "--data", zp, "--cache-dir", tmp_path / "c", "--out", out,
            "--epochs", 1, "--no-progress", cwd=tmp_path)
    assert_user_error(p, str(zp), "every one of the 6 test images", "byte-identical")
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()
    p = run("data.prepare", "--data", zp, "--cache-dir", tmp_path / "c", "--json", cwd=tmp_path)
    assert_ok(p)  # the report still works, and says it
    assert json.loads(p.stdout)["test_deduplicated_size"] == 0


# ------------------------------------------------------------------ folders, files
def test_a_symlinked_class_folder_is_followed(tiny_zip, tmp_path):
    tree = extract_to(tiny_zip, tmp_path / "tree")
    elsewhere = tmp_path / "elsewhere"
    (tree / "train" / "REAL").rename(elsewhere)
    (tree / "train" / "REAL").symlink_to(elsewhere, target_is_directory=True)
    ds = load_cifake(tree, tmp_path / "c", verbose=False)
    assert int((ds.train.labels == 1).sum()) == 6


def test_a_symlink_loop_does_not_hang(tiny_zip, tmp_path):
    tree = extract_to(tiny_zip, tmp_path / "tree")
    (tree / "train" / "REAL" / "loop").symlink_to(tree, target_is_directory=True)
    with pytest.raises(DataError, match="unexpected sub-folder inside a class folder"):
        load_cifake(tree, tmp_path / "c", verbose=False)


def test_run_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "x.json", b"{}")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "y.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "y.json").stat().st_mode & 0o777 == 0o600


def test_an_unreadable_json_is_not_called_invalid_json(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(UserError, match=r"config\.json: cannot read \(Is a directory\)"):
        read_json(tmp_path / "config.json")


def test_permission_denied_says_so(tmp_path):
    if not can_drop_privileges():
        pytest.skip("cannot run a child as an unprivileged user (need root + setpriv)")
    d = world_tmpdir()
    r = mlp_run(d / "run")
    for f in [r, *r.iterdir()]:
        f.chmod(0o755 if f.is_dir() else 0o644)
    (r / "config.json").chmod(0)
    img = good_jpeg(d / "a.jpg")
    img.chmod(0o644)
    p = run("numpy_mlp.predict", "--run", r, img, user=NOBODY, cwd="/")
    assert_user_error(p, "config.json", "permission denied")
    (r / "config.json").chmod(0o644)
    (r / "model.safetensors").chmod(0)
    p = run("numpy_mlp.predict", "--run", r, img, user=NOBODY, cwd="/")
    assert_user_error(p, "model.safetensors", "permission denied")


# ------------------------------------------------------------------ checkpoints

def test_an_oversized_extra_tensor_is_refused_from_the_header(tmp_path):
    """A checkpoint carrying an extra 512 MiB tensor was loaded whole (1.6 GiB peak)
    before its names were checked. The file is sparse: it costs no disk."""
    r = mlp_run(tmp_path / "run")
    # append to the header a tensor X of 512 MiB after the others, and extend the file
    # (sparsely) to cover it
    path = r / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    big = 512 * 2**20
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["X"] = {"dtype": "F32", "shape": [big // 4], "data_offsets": [end, end + big]}
    body = raw[8 + n:8 + n + end]
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + body)
        f.truncate(8 + len(h) + end + big)
    img = good_jpeg(tmp_path / "a.jpg")
    p = subprocess.run([sys.executable, "-c", _RSS_PROBE,
                        *cmd("numpy_mlp.predict", "--run", r, img)],
                       env=env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    rc, peak_kib = map(int, p.stdout.split())
    assert rc == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "unexpected ['X']" in last_line(p.stderr)
    assert peak_kib < 300 * 1024, f"the child peaked at {peak_kib / 1024:.0f} MiB"


# ------------------------------------------------------------------ bench, packaging
def test_bench_cache_dir_and_data_are_relative_to_the_users_cwd(tmp_path, monkeypatch, capsys):
    from bench import compare
    from data.errors import run_cli
    make_archive(tmp_path / "tiny.zip")
    monkeypatch.chdir(tmp_path)
    specs = []
    real = compare.run_worker

    def fake_worker(argv, env_, timeout):  # records each backend's spec instead of running it
        if argv[:1] == ["bench.speed.worker"] and argv[1].startswith("{"):
            specs.append(json.loads(argv[1]))
            return None, "not run in this test"
        return real(argv, env_, timeout)
    monkeypatch.setattr(compare, "run_worker", fake_worker)
    with pytest.raises(SystemExit):
        run_cli(compare.main, ["--data", "tiny.zip", "--cache-dir", "rel-cache", "--out", "res",
                               "--backends", "numpy-mlp", "--models", "mlp4", "--devices", "cpu",
                               "--no-parity"], prog="bench.compare")
    err = capsys.readouterr().err
    assert specs and all(s["cache_dir"] == str(tmp_path / "rel-cache") for s in specs), err
    assert all(s["data"] == str(tmp_path / "tiny.zip") for s in specs)
    assert (tmp_path / "rel-cache").is_dir()


@pytest.mark.parametrize("seed,needle", [("-5", "got -5"), ("4294967296", "at most"),
                                         ("4294967294", "--budget-seeds 3")])
def test_bench_seed_is_validated(seed, needle):
    """`bench.compare --seed -5` ran the whole bench with a seed no stack accepts. (The
    impossible --models choice makes a run that accepts the seed stop at once.)"""
    from bench import compare
    with pytest.raises(UserError, match="--seed") as e:
        compare.main(["--seed", seed, "--budget-seeds", "3", "--backends", "numpy-mlp",
                      "--models", "v3"])
    assert needle in str(e.value)


_RESULT_ROW = {"key": "bilinear+jpeg75", "n": 16, "n_fake": 3, "mean_p_fake": 0.3,
               "chosen": True}


@pytest.mark.parametrize("doc,needle", [
    ({"rows": "bilinear"}, "'rows' has the wrong type"),
    ({"rows": ["x"]}, "rows[0]: not an object"),
    ({"rows": []}, "'rows' is empty"),
    ({"rows": [dict(_RESULT_ROW, n_fake="3")]}, "'n_fake' has the wrong type"),
    ({"rows": [dict(_RESULT_ROW, chosen=False)]}, "no row is the chosen"),
    ({"rows": [dict(_RESULT_ROW, mean_p_fake=7)]}, "'mean_p_fake' must be a share"),
    ({"rows": [_RESULT_ROW], "roundtrip": []}, "'roundtrip' has the wrong type"),
    ({"rows": [_RESULT_ROW], "roundtrip": {"rows": {"bilinear+jpeg75": 0.5}}},
     "not an object"),
    ({"rows": [_RESULT_ROW], "roundtrip": {"rows": {"bilinear+jpeg75": {"REAL": 1}}}},
     "'FAKE' missing"),
], ids=["rows_text", "row_text", "no_rows", "count_text", "none_chosen", "share_7",
        "roundtrip_list", "roundtrip_row_number", "roundtrip_no_fake"])
def test_a_realworld_result_of_the_wrong_shape_is_one_line(doc, needle, tmp_path):
    """A realworld.json handed to the web page's --realworld whose rows were text, or whose
    round trip was a list, raised an AttributeError traceback; the reader of the results
    now checks their shape and names the file."""
    from cifake.realworld import read_result
    f = tmp_path / "realworld.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(UserError) as e:
        read_result(f)
    assert str(e.value).startswith(str(f)) and needle in str(e.value), str(e.value)
    good = {"rows": [_RESULT_ROW, dict(_RESULT_ROW, key="box", chosen=False)],
            "roundtrip": {"rows": {"bilinear+jpeg75": {"REAL": 0.9, "FAKE": 0.8}}}}
    f.write_text(json.dumps(good))
    assert read_result(f) == good


@pytest.mark.slow
def test_entry_points_work_from_a_folder_holding_a_data_folder(tmp_path):
    """`pip install -e .` into a fresh venv (dependencies borrowed from this one, nothing
    downloaded), then an entry point run from a folder that holds an (empty) `data/`, as
    a user keeping datasets in ./data does, without PYTHONPATH. The setuptools import
    hook used to lose to that folder: ImportError."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: this venv's packages (pip, setuptools, numpy...) become importable,
    # but its own .pth files (the editable install of whichever checkout) are not run
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-e", str(REPO)], capture_output=True, text=True,
                       env=clean, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    user = tmp_path / "project"
    (user / "data").mkdir(parents=True)
    mlp_run(user / "run")
    good_jpeg(user / "a.jpg")
    p = subprocess.run([py, "-m", "numpy_mlp.predict", "--run", "run", "a.jpg"], cwd=user,
                       env=clean, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "P(FAKE)=" in p.stdout, p.stderr[-2000:]
