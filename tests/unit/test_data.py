"""Unit tests of the shared data layer (data/): sources, decoding, cache, CLI, batching.

Every test builds its own tiny archive in tmp_path (tests.helpers.make_archive),
so the whole file runs in a few seconds and needs no dataset.
"""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import data.cache as cache_mod
from data import (CLASSES, LABEL_OF, DataError, UserError, augment, augment_draws, batch_slices,
                  epoch_order, identity_draws, load_cifake, load_image_for_model, to_float)
from data.batching import AugDraws
from data.images import decode_dataset_image
from tests.helpers import REPO, extract_to, image_bytes, make_archive, synthetic_image

FIELDS = ("images", "labels", "cifar_class", "digests", "names")


# ------------------------------------------------------------------ helpers
def rezip(src: Path, dst: Path, rename=lambda n: n, extra: dict[str, bytes] | None = None,
          compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy a zip's members into a new zip, renaming them and adding ``extra``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for i in zin.infolist():
            zout.writestr(rename(i.filename), zin.read(i))
        for name, b in (extra or {}).items():
            zout.writestr(name, b)
    return dst


def member(zip_path: Path, name: str) -> bytes:
    with zipfile.ZipFile(zip_path) as z:
        return z.read(name)


def assert_same_splits(a, b):
    for split in ("train", "test"):
        for f in FIELDS:
            x, y = getattr(getattr(a, split), f), getattr(getattr(b, split), f)
            assert x.dtype == y.dtype and x.shape == y.shape, (split, f)
            np.testing.assert_array_equal(x, y, err_msg=f"{split}.{f}")


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, and no pixel data.

    Costs a few bytes, whatever size it declares (a decompression-bomb stand-in)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def run_prepare(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=120)


def load(path, cache_dir, **kw):
    return load_cifake(path, cache_dir=cache_dir, verbose=False, **kw)


# ------------------------------------------------------------------ sources
def test_zip_counts_labels_names_cifar_class(tiny_zip, cache_dir):
    ds = load(tiny_zip, cache_dir)
    for split, n in (("train", 6), ("test", 3)):
        s = getattr(ds, split)
        assert len(s) == 2 * n
        assert s.images.shape == (2 * n, 32, 32, 3) and s.images.dtype == np.uint8
        assert s.labels.dtype == np.uint8 and s.digests.dtype == np.dtype("S20")
        assert (s.labels == 0).sum() == n and (s.labels == 1).sum() == n
        # label follows the class folder in the name; FAKE first (label order), natural order
        folder = np.array([name.split("/")[0] for name in s.names])
        np.testing.assert_array_equal(s.labels, (folder == "REAL").astype(np.uint8))
        files = [name.split("/")[1] for name in s.names[:n]]
        expect = [f"{i}.jpg" if i % 10 == 0 else f"{i} ({i % 10 + 1}).jpg" for i in range(n)]
        assert files == expect
        np.testing.assert_array_equal(s.cifar_class[:n], [i % 10 + 1 for i in range(n)])
    assert ds.manifest["counts"] == {"train": {"FAKE": 6, "REAL": 6},
                                     "test": {"FAKE": 3, "REAL": 3}}
    # pixels are the decoded JPEG members, one by one
    raw = member(tiny_zip, "train/REAL/1 (2).jpg")
    i = list(ds.train.names).index("REAL/1 (2).jpg")
    np.testing.assert_array_equal(ds.train.images[i], np.asarray(Image.open(io.BytesIO(raw))))


def test_label_convention_fake0_real1(tiny_zip, cache_dir):
    assert CLASSES == ("FAKE", "REAL") and LABEL_OF == {"FAKE": 0, "REAL": 1}
    ds = load(tiny_zip, cache_dir)
    # the synthetic REAL images are bright on the left half, FAKE on the right half
    img = ds.train.images.astype(float)
    left_brighter = img[:, :, :16].mean(axis=(1, 2, 3)) > img[:, :, 16:].mean(axis=(1, 2, 3))
    np.testing.assert_array_equal(left_brighter, ds.train.labels == 1)


def test_folder_source_equals_zip(tiny_zip, tmp_path):
    folder = extract_to(tiny_zip, tmp_path / "extracted")
    a = load(tiny_zip, tmp_path / "c1")
    b = load(folder, tmp_path / "c2")
    assert_same_splits(a, b)
    assert b.manifest["source"]["kind"] == "dir"


def test_file_names_that_are_not_utf8(tiny_zip, tmp_path):
    """A folder dataset holding a name that is not UTF-8 (ignored or an image) loads, as
    the zip does; a zip member flagged as UTF-8 whose name is not is one error line (both
    used to be tracebacks)."""
    folder = extract_to(tiny_zip, tmp_path / "extracted")
    (folder / os.fsdecode(b"notes-\xe9t\xe9.txt")).write_text("ignored")
    img = next((folder / "train" / "REAL").iterdir())
    img.rename(folder / "train" / "REAL" / os.fsdecode(b"\xff" + img.name.encode()))
    a, b = load(tiny_zip, tmp_path / "c1"), load(folder, tmp_path / "c2")
    assert len(a.train) == len(b.train) and b.manifest["ignored_files"] == 1
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("train/REAL/x.png", b"x")
    # the name's one byte 'x' becomes 0xff, and both headers flag the name as UTF-8
    # (general purpose bit 11; the flag's offset is 6 in the local, 8 in the central header)
    data = bytearray(bad.read_bytes().replace(b"x.png", b"\xff.png"))
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.find(sig) + flag_at + 1] |= 0x08
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="flagged as UTF-8 but is not"):
        load(bad, tmp_path / "c3")


def test_wrapper_folder_layout(tiny_zip, tmp_path):
    wrapped = rezip(tiny_zip, tmp_path / "wrapped.zip", rename=lambda n: "cifake/" + n)
    assert_same_splits(load(tiny_zip, tmp_path / "c1"), load(wrapped, tmp_path / "c2"))
    folder = extract_to(wrapped, tmp_path / "wrapped_dir")
    assert_same_splits(load(tiny_zip, tmp_path / "c1"), load(folder, tmp_path / "c3"))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                         zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_compressed_members_read_the_same(tiny_zip, tmp_path, compression):
    # make_archive stores members; the Kaggle zip deflates them; every method is read by
    # data.source itself (size-capped), none by zipfile.read
    other = rezip(tiny_zip, tmp_path / "c.zip", compression=compression)
    assert_same_splits(load(tiny_zip, tmp_path / "c1"), load(other, tmp_path / "c2"))


def test_worker_processes_give_the_same_cache(tmp_path, monkeypatch):
    z = make_archive(tmp_path / "t.zip", n_train=8, n_test=4)
    single = load(z, tmp_path / "c1")
    # with 3-image tasks the 48 images make 16 tasks: the process-pool path runs
    monkeypatch.setattr(cache_mod, "DECODE_CHUNK", 3)
    src = data.source.open_source(z)
    m = cache_mod.build_cache(src, tmp_path / "c2" / "x", workers=2, progress=False)
    pooled = data.CIFAKE(cache_mod._load_split(tmp_path / "c2" / "x", "train", m),
                         cache_mod._load_split(tmp_path / "c2" / "x", "test", m), {})
    assert_same_splits(single, pooled)
    # a bad image found by a worker is reported the same way
    bad = make_archive(tmp_path / "bad.zip", n_train=8, n_test=4,
                       extra={"train/REAL/7 (8).jpg": b"not a jpeg"})
    with pytest.raises(DataError, match=r"train/REAL/7 \(8\)\.jpg"):
        cache_mod.build_cache(data.source.open_source(bad), tmp_path / "c3" / "x", workers=2,
                              progress=False)


# ------------------------------------------------------------------ cache
def test_cache_reused_then_rebuilt_when_source_changes(tmp_path, cache_dir, capsys):
    z = make_archive(tmp_path / "t.zip")
    first = load_cifake(z, cache_dir=cache_dir)
    assert "building CIFAKE cache" in capsys.readouterr().err
    second = load_cifake(z, cache_dir=cache_dir)
    assert "building" not in capsys.readouterr().err
    assert_same_splits(first, second)
    # same archive rewritten with one image changed (the sleep guarantees a new mtime
    # even on file systems with coarse timestamps)
    time.sleep(0.02)
    changed = image_bytes(255 - synthetic_image(1, 3))
    make_archive(z, extra={"train/REAL/3 (4).jpg": changed})
    third = load_cifake(z, cache_dir=cache_dir)
    err = capsys.readouterr().err
    assert "building CIFAKE cache" in err and "changed" in err
    i = list(third.train.names).index("REAL/3 (4).jpg")
    np.testing.assert_array_equal(third.train.images[i], np.asarray(Image.open(io.BytesIO(changed))))
    assert not np.array_equal(third.train.images[i], first.train.images[i])
    # only the one image differs
    keep = np.arange(len(first.train)) != i
    np.testing.assert_array_equal(third.train.images[keep], first.train.images[keep])


def test_cache_reuse_does_not_rebuild(tiny_zip, cache_dir, monkeypatch):
    load(tiny_zip, cache_dir)

    def boom(*a, **k):
        raise AssertionError("cache rebuilt although the source did not change")
    monkeypatch.setattr(cache_mod, "build_cache", boom)
    load(tiny_zip, cache_dir)


def test_interrupted_build_leaves_nothing_that_loads(tiny_zip, cache_dir, monkeypatch, capsys):
    calls = {"n": 0}
    real = cache_mod.decode_dataset_image

    def flaky(raw, where):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # Ctrl-C in the middle of decoding
        return real(raw, where)
    monkeypatch.setattr(cache_mod, "decode_dataset_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        load(tiny_zip, cache_dir)
    assert list(cache_dir.iterdir()) == []  # neither a cache nor its temporary folder
    monkeypatch.setattr(cache_mod, "decode_dataset_image", real)
    ds = load_cifake(tiny_zip, cache_dir=cache_dir)
    assert "no complete cache yet" in capsys.readouterr().err
    assert len(ds.train) == 12


def test_killed_build_leaves_an_untrusted_temp_folder(tiny_zip, cache_dir, capsys):
    """kill -9 during the build: its temporary folder stays behind but is never loaded."""
    code = (
        "import sys, time, data.cache as c\n"
        "real = c.decode_dataset_image\n"
        "n = [0]\n"
        "def slow(raw, where):\n"
        "    n[0] += 1\n"
        "    if n[0] == 5:\n"
        "        print('decoding', flush=True); time.sleep(60)\n"
        "    return real(raw, where)\n"
        "c.decode_dataset_image = slow\n"
        f"c.load_cifake({str(tiny_zip)!r}, cache_dir={str(cache_dir)!r}, verbose=False)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "decoding"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        p.stdout.close()
    # the killed process's lock file stays too (the kernel released its lock)
    leftovers = [d for d in cache_dir.iterdir() if not d.name.endswith(".lock")]
    assert [d.name.split(".tmp-")[1] for d in leftovers] == [str(p.pid)]
    ds = load_cifake(tiny_zip, cache_dir=cache_dir)
    assert "no complete cache yet" in capsys.readouterr().err
    assert len(ds.train) == 12
    # the dead build's folder was cleared away by the next build
    assert [d.name for d in cache_dir.iterdir()] == [cache_mod._source_key(tiny_zip.resolve())]


def test_corrupt_manifest_rebuilds(tiny_zip, cache_dir, capsys):
    a = load(tiny_zip, cache_dir)
    (target,) = cache_dir.iterdir()
    (target / "manifest.json").write_text("{not json")
    b = load_cifake(tiny_zip, cache_dir=cache_dir)
    assert "building CIFAKE cache" in capsys.readouterr().err
    assert_same_splits(a, b)
    # a manifest from another format version rebuilds too
    m = json.loads((target / "manifest.json").read_text())
    m["format_version"] = -1
    (target / "manifest.json").write_text(json.dumps(m))
    load_cifake(tiny_zip, cache_dir=cache_dir)
    assert "cache format -1" in capsys.readouterr().err


def test_truncated_cache_array_is_a_data_error_naming_it(tiny_zip, cache_dir):
    load(tiny_zip, cache_dir)
    (target,) = cache_dir.iterdir()
    f = target / "train_images.npy"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(DataError, match="train_images.npy"):
        load(tiny_zip, cache_dir)


def test_subset_per_class(tiny_zip, cache_dir):
    full = load(tiny_zip, cache_dir)
    sub = load(tiny_zip, cache_dir, subset=2)
    for split in ("train", "test"):
        s, f = getattr(sub, split), getattr(full, split)
        assert len(s) == 4 and (s.labels == 0).sum() == 2 and (s.labels == 1).sum() == 2
        # the first two of each class, in file-name order
        want = [n for c in CLASSES for n in [x for x in f.names if x.startswith(c)][:2]]
        assert list(s.names) == want
        idx = [list(f.names).index(n) for n in s.names]
        np.testing.assert_array_equal(s.images, f.images[idx])
    assert len(load(tiny_zip, cache_dir, subset=100).train) == 12  # more than there are: all
    with pytest.raises(DataError, match="--subset"):
        load(tiny_zip, cache_dir, subset=0)


def test_duplicates_and_leak_planted(tmp_path, cache_dir):
    base = make_archive(tmp_path / "base.zip")
    fake0 = member(base, "train/FAKE/0.jpg")
    real1 = member(base, "train/REAL/1 (2).jpg")
    z = make_archive(tmp_path / "t.zip", extra={
        "test/FAKE/100.jpg": fake0,            # leak: a train image in test
        "test/FAKE/101.jpg": fake0,            # the same leaked image again (2 leaked, 1 distinct)
        "train/REAL/200.jpg": real1,           # a duplicate inside train/REAL
        "train/REAL/201.jpg": real1,           # and another copy of it
    })
    ds = load(z, cache_dir)
    dedup = ds.test_deduplicated()
    assert len(ds.test) == 8 and len(dedup) == 6
    assert "FAKE/100.jpg" not in dedup.names and "FAKE/101.jpg" not in dedup.names
    assert not np.isin(dedup.digests, ds.train.digests).any()
    r = run_prepare("--data", str(z), "--cache-dir", str(cache_dir), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["counts"] == {"train": {"FAKE": 6, "REAL": 8}, "test": {"FAKE": 5, "REAL": 3}}
    assert rep["duplicates"] == {"train": {"FAKE": 0, "REAL": 2}, "test": {"FAKE": 1, "REAL": 0}}
    assert rep["test_in_train"] == {"images": 2, "distinct": 1}
    assert rep["test_deduplicated_size"] == 6


# ------------------------------------------------------------------ bad inputs
def _jpeg(size=32, **kw) -> bytes:
    return image_bytes(synthetic_image(1, 0, size), **kw)


BAD_MEMBERS = {
    "truncated JPEG": ("train/REAL/90.jpg", _jpeg()[:-100], "corrupt or truncated"),
    "JPEG header only": ("train/REAL/90.jpg", _jpeg()[:20], "not a readable image"),
    "text named .jpg": ("train/FAKE/90.jpg", b"this is not an image\n", "not a readable image"),
    "64x64": ("test/REAL/90.jpg", _jpeg(64), "64x64"),
    "1x1": ("test/FAKE/90.png", image_bytes(np.zeros((1, 1, 3)), fmt="PNG"), "1x1"),
    "bomb": ("train/REAL/90.png", png_header_only(100_000, 100_000), "decompression bomb"),
    "non-image extension": ("train/REAL/notes.txt", b"hello", "not an image file"),
    "sub-folder": ("train/REAL/more/90.jpg", _jpeg(), "sub-folder"),
    "'..' entry": ("train/REAL/../../evil.jpg", _jpeg(), "'..'"),
    "absolute entry": ("/train/REAL/90.jpg", _jpeg(), "absolute"),
    "backslash entry": ("train\\REAL\\90.jpg", _jpeg(), "non-POSIX"),
}


@pytest.mark.parametrize("case", list(BAD_MEMBERS))
def test_bad_member_is_a_data_error_naming_it(tmp_path, cache_dir, case):
    name, payload, why = BAD_MEMBERS[case]
    z = make_archive(tmp_path / "bad.zip", extra={name: payload})
    with pytest.raises(DataError) as e:
        load(z, cache_dir)
    msg = str(e.value)
    assert (name in msg or repr(name) in msg) and why in msg and str(z) in msg
    assert list(cache_dir.iterdir()) == []  # nothing half-built left behind


@pytest.mark.parametrize("case,drop,extra,why", [
    ("missing test split", ("test/",), {}, "missing split folder 'test/'"),
    ("missing class folder", ("train/REAL/",), {}, "missing class folder 'train/REAL/'"),
    ("empty class folder", ("test/FAKE/",), {"test/FAKE/": b""},
     "class folder 'test/FAKE/' holds no images"),
])
def test_bad_layout(tmp_path, cache_dir, case, drop, extra, why):
    z = make_archive(tmp_path / "bad.zip", drop=drop)
    if extra:
        z = rezip(z, tmp_path / "bad2.zip", extra=extra)
    with pytest.raises(DataError, match=why.replace("(", r"\(")) as e:
        load(z, cache_dir)
    assert str(z) in str(e.value)
    # the same tree as a folder fails the same way
    folder = extract_to(z, tmp_path / "tree")
    with pytest.raises(DataError, match=why) as e:
        load(folder, cache_dir)
    assert str(folder) in str(e.value)


def test_bad_files_in_a_folder_source(tiny_zip, tmp_path, cache_dir):
    folder = extract_to(tiny_zip, tmp_path / "tree")
    (folder / "train" / "REAL" / "sub").mkdir()
    with pytest.raises(DataError, match="sub-folder.*train/REAL/sub"):
        load(folder, cache_dir)
    (folder / "train" / "REAL" / "sub").rmdir()
    (folder / "test" / "FAKE" / "90.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test/FAKE/90.jpg.*not a readable image"):
        load(folder, cache_dir)


def test_truncated_and_non_zip_archives(tiny_zip, tmp_path, cache_dir):
    cut = tmp_path / "cut.zip"
    cut.write_bytes(tiny_zip.read_bytes()[: tiny_zip.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.zip: not a zip archive"):
        load(cut, cache_dir)
    text = tmp_path / "notes.zip"
    text.write_text("hello, I am not a zip\n")
    with pytest.raises(DataError, match="notes.zip: not a zip archive"):
        load(text, cache_dir)
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "missing.zip", cache_dir)


def test_corrupt_member_bytes_fail_the_crc_check(tmp_path, cache_dir):
    z = make_archive(tmp_path / "t.zip")  # stored members: flip bytes inside one image
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("train/FAKE/2 (3).jpg")
    blob = bytearray(z.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + 200
    blob[start:start + 8] = bytes(8)
    z.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train/FAKE/2 \(3\)\.jpg.*CRC"):
        load(z, cache_dir)


def test_unsupported_compression_method_is_a_data_error(tmp_path, cache_dir):
    z = make_archive(tmp_path / "t.zip")
    with zipfile.ZipFile(z) as zf:
        first = zf.infolist()[0]  # its central-directory record is the first one
        start_dir = zf.start_dir
    blob = bytearray(z.read_bytes())
    # method field: +8 in the local header, +10 in the central record; 99 is no method
    blob[first.header_offset + 8:first.header_offset + 10] = struct.pack("<H", 99)
    blob[start_dir + 10:start_dir + 12] = struct.pack("<H", 99)
    z.write_bytes(bytes(blob))
    with zipfile.ZipFile(z) as zf, pytest.raises(NotImplementedError):
        zf.read(first.filename)  # what zipfile itself does with it
    with pytest.raises(DataError, match=f"{first.filename}.*not supported"):
        load(z, cache_dir)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("L", "JPEG"), ("RGBA", "PNG"),
                                      ("P", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG")])
def test_modes_converted_to_rgb(tmp_path, cache_dir, mode, fmt):
    raw = image_bytes(synthetic_image(1, 7), fmt=fmt, mode=mode)
    assert Image.open(io.BytesIO(raw)).mode == mode
    name = f"train/REAL/77.{fmt.lower()}"
    ds = load(make_archive(tmp_path / "t.zip", extra={name: raw}), cache_dir)
    i = list(ds.train.names).index(name.split("/", 1)[1])
    want = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    np.testing.assert_array_equal(ds.train.images[i], want)


def test_extra_files_ignored_and_counted(tmp_path, cache_dir):
    z = make_archive(tmp_path / "t.zip", extra={
        "README.txt": b"about", "train/notes.md": b"x", "train/OTHER/1.jpg": _jpeg(),
        # OS metadata: ignored silently, not counted
        "__MACOSX/train/REAL/._1.jpg": b"", ".DS_Store": b"", "train/REAL/._2.jpg": b"",
        "train/REAL/Thumbs.db": b""})
    ds = load(z, cache_dir)
    assert len(ds.train) == 12 and ds.manifest["ignored_files"] == 3
    r = run_prepare("--data", str(z), "--cache-dir", str(cache_dir))
    assert r.returncode == 0, r.stderr
    assert "files outside train|test/REAL|FAKE ignored: 3" in r.stdout


# ------------------------------------------------------------------ CLI, env, kagglehub
def test_prepare_cli_report(tiny_zip, cache_dir):
    r = run_prepare("--data", str(tiny_zip), "--cache-dir", str(cache_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"source: {tiny_zip.resolve()}" in lines
    assert [ln.split() for ln in lines if ln.split()[1:2] in (["FAKE"], ["REAL"])] == [
        ["train", "FAKE", "6", "0"], ["train", "REAL", "6", "0"],
        ["test", "FAKE", "3", "0"], ["test", "REAL", "3", "0"]]
    assert "test images also in train: 0 (0 distinct)" in lines


@pytest.mark.parametrize("what", ["bad archive", "missing path"])
def test_prepare_cli_errors_are_one_line(tmp_path, cache_dir, what):
    if what == "bad archive":
        p = make_archive(tmp_path / "bad.zip", extra={"train/REAL/90.jpg": b"nope"})
    else:
        p = tmp_path / "nowhere.zip"
    r = run_prepare("--data", str(p), "--cache-dir", str(cache_dir))
    assert r.returncode == 2
    # stderr may hold the "building CIFAKE cache ..." progress line first
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and r.stderr.strip().endswith(err[0]) and str(p) in err[0], r.stderr
    assert "Traceback" not in r.stderr and "0x" not in err[0]  # no object reprs either


def test_cifake_path_env_is_used(tiny_zip, cache_dir, monkeypatch):
    monkeypatch.setenv("CIFAKE_PATH", str(tiny_zip))
    ds = load_cifake(None, cache_dir=cache_dir, verbose=False)
    assert ds.manifest["source"]["path"] == str(tiny_zip.resolve())
    # --data wins over the variable
    other = make_archive(tiny_zip.parent / "other.zip", n_train=2, n_test=1)
    assert len(load(other, cache_dir).train) == 4
    r = run_prepare("--cache-dir", str(cache_dir), "--json", env={"CIFAKE_PATH": str(tiny_zip)})
    assert r.returncode == 0 and json.loads(r.stdout)["counts"]["test"] == {"FAKE": 3, "REAL": 3}


def test_kagglehub_missing_is_a_clear_error(cache_dir, monkeypatch):
    monkeypatch.delenv("CIFAKE_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # makes `import kagglehub` fail
    with pytest.raises(DataError, match="pass --data PATH.*CIFAKE_PATH.*kagglehub"):
        load_cifake(None, cache_dir=cache_dir, verbose=False)


# ------------------------------------------------------------------ images for predict
def test_load_image_for_model(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(synthetic_image(0, 1, size=64)).save(p)
    arr, resized, size = load_image_for_model(str(p))
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8 and resized and size == (64, 64)
    p32 = tmp_path / "small.png"
    Image.fromarray(synthetic_image(0, 1)).convert("L").save(p32)
    arr, resized, size = load_image_for_model(str(p32))
    assert not resized and size == (32, 32)
    np.testing.assert_array_equal(arr, np.asarray(Image.open(p32).convert("RGB")))
    for bad, why in ((png_header_only(100_000, 100_000), "decompression bomb"),
                     (png_header_only(7000, 7000), "decompression bomb"),  # warning range
                     (b"text", "not a readable image")):
        f = tmp_path / "bad.png"
        f.write_bytes(bad)
        with pytest.raises(DataError, match=f"bad.png.*{why}"):
            load_image_for_model(str(f))
    with pytest.raises(DataError, match="(?i)is a directory"):
        load_image_for_model(str(tmp_path))
    with pytest.raises(DataError, match="cannot read"):
        load_image_for_model(str(tmp_path / "absent.png"))


def test_decode_dataset_image_direct():
    ok = decode_dataset_image(_jpeg(), "x.jpg")
    assert ok.shape == (32, 32, 3) and ok.dtype == np.uint8
    with pytest.raises(DataError, match="^where.jpg: image is 31x32"):
        decode_dataset_image(image_bytes(np.zeros((32, 31, 3))), "where.jpg")


# ------------------------------------------------------------------ batching
def test_epoch_order():
    a = epoch_order(7, 0, 1000)
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))
    np.testing.assert_array_equal(a, epoch_order(7, 0, 1000))
    assert not np.array_equal(a, epoch_order(7, 1, 1000))
    assert not np.array_equal(a, epoch_order(8, 0, 1000))
    assert not np.array_equal(a, np.arange(1000))


def test_batch_slices():
    order = epoch_order(0, 0, 10)
    sl = batch_slices(10, 3)
    assert [(s.start, s.stop) for s in sl] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    covered = np.concatenate([order[s] for s in sl])
    np.testing.assert_array_equal(np.sort(covered), np.arange(10))  # each exactly once
    assert [(s.start, s.stop) for s in batch_slices(10, 3, drop_last=True)] == [(0, 3), (3, 6),
                                                                                 (6, 9)]
    assert batch_slices(10, None) == [slice(0, 10)]
    assert [(s.start, s.stop) for s in batch_slices(10, 5)] == [(0, 5), (5, 10)]
    assert len(batch_slices(10, 64)) == 1 and batch_slices(10, 64)[0] == slice(0, 10)
    assert data.num_batches(10, 3) == 4 and data.num_batches(10, 3, drop_last=True) == 3
    with pytest.raises(UserError, match="--batch-size"):
        batch_slices(10, 0)


def test_augment_draws():
    d = augment_draws(3, 0, 20_000)
    assert len(d) == 20_000
    for v in (d.dy, d.dx):
        assert v.min() == 0 and v.max() == 8 and set(np.unique(v)) == set(range(9))
    assert 0.48 < d.flip.mean() < 0.52
    same = augment_draws(3, 0, 20_000)
    np.testing.assert_array_equal(d.dy, same.dy)
    np.testing.assert_array_equal(d.flip, same.flip)
    assert not np.array_equal(d.dy, augment_draws(3, 1, 20_000).dy)
    part = d[10:20]
    np.testing.assert_array_equal(part.dx, d.dx[10:20])


def test_augment_reference():
    rng = np.random.default_rng(0)
    imgs = rng.integers(1, 256, size=(3, 32, 32, 3), dtype=np.uint8)  # no zero pixels
    np.testing.assert_array_equal(augment(imgs, identity_draws(3)), imgs)
    draws = AugDraws(dy=np.array([0, 8, 4], np.int32), dx=np.array([0, 8, 0], np.int32),
                     flip=np.array([False, False, True]))
    out = augment(imgs, draws)
    assert out.shape == imgs.shape and out.dtype == np.uint8
    # offset (0, 0): 4 rows and 4 columns of padding at top-left, then the image's top-left
    assert (out[0, :4] == 0).all() and (out[0, :, :4] == 0).all()
    np.testing.assert_array_equal(out[0, 4:, 4:], imgs[0, :28, :28])
    # offset (8, 8): the image's bottom-right, padding at bottom-right
    np.testing.assert_array_equal(out[1, :28, :28], imgs[1, 4:, 4:])
    assert (out[1, 28:] == 0).all() and (out[1, :, 28:] == 0).all()
    # offset (4, 0) then flip: columns reversed after the crop
    cropped = np.zeros_like(imgs[2])
    cropped[:, 4:] = imgs[2, :, :28]
    np.testing.assert_array_equal(out[2], cropped[:, ::-1])
    with pytest.raises(ValueError):
        augment(imgs, identity_draws(2))


def test_to_float():
    x = to_float(np.array([0, 51, 255], np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [0.0, 0.2, 1.0], rtol=1e-7)
    assert to_float(np.array([255], np.uint8), np.float64).dtype == np.float64


def test_safetensors_files_are_byte_reproducible(tmp_path):
    """Equal tensors and metadata give equal bytes (the library writes metadata in hash
    order), and the reordered header still loads."""
    from core.tensors import load_safetensors, save_safetensors
    t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float64),
         "n": np.asarray(7, np.int64)}
    meta = {f"key{i}": f"value {i} é" for i in range(12)}
    save_safetensors(tmp_path / "a.safetensors", t, meta)
    save_safetensors(tmp_path / "b.safetensors", t, dict(reversed(list(meta.items()))))
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert a == b
    back, back_meta = load_safetensors(tmp_path / "a.safetensors")
    assert set(back) == set(t) and all(np.array_equal(back[k], t[k]) for k in t)
    assert back["n"].shape == () and {k: back_meta[k] for k in meta} == meta
