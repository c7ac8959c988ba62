"""The bad-input corpus: every kind of broken file or value a user can hand the tool,
generated here in tmp_path (never committed), fed to the REAL entry points in
subprocesses (``python -m data.prepare``, ``<stack>.train``, ``<stack>.predict``).

For every failure case the test asserts: nonzero exit, stderr's last line starts with
``error:`` and names the file or value, no ``Traceback``, and nothing a later run would
trust is left behind (no cache folder with a manifest.json, no metrics.json /
model.safetensors in --out, a resumed run's files unchanged). The "success" cases
(RGBA, grayscale, palette images) must load, converted to RGB.

Speed: data-layer cases go through ``data.prepare`` and the NumPy stack (fast imports);
a representative few go through torch_cnn / jax_port (each subprocess pays seconds of
torch/jax import).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (extract_to, image_bytes, make_archive, png_bomb,
                           synthetic_image, train_argv)
from tests.helpers import (NOBODY, assert_no_trusted_run, assert_ok, assert_user_error,
                           can_drop_privileges, last_line, run, trusted_caches,
                           world_tmpdir)


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


PREDICT_RUN_CASES = {
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
