"""Inputs that used to crash, hang, eat memory or give silently wrong answers, each with
the behaviour that replaced it (docs/reliability.md, second table). Generated in
tmp_path; entry points run as subprocesses where what the user sees is the point,
in-process where the check is about one function's output or memory."""
from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import sysconfig
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

from core.rundir import RUN_FORMAT
import numpy as np
import pytest
from PIL import Image

import data.cache as cache_mod
from data import load_cifake
from data.errors import DataError, UserError
from data.images import PREDICT_BATCH, load_image_for_model
from core.predict import DetectorBase
from core.atomic import atomic_write_bytes
from core.rundir import read_json
from tests.helpers import require, REPO, extract_to, image_bytes, make_archive, synthetic_image
from tests.helpers import (NOBODY, assert_ok, assert_user_error, can_drop_privileges, cmd, env,
                           last_line, mlp_run, run, world_tmpdir)


# ------------------------------------------------------------------ helpers
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
_RSS_PROBE = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], "
              "capture_output=True, text=True); sys.stderr.write(p.stderr); "
              "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


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
