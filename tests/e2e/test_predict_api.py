"""The Python API (``<stack>.predict.Detector``) and the predict commands on folders and
many files: the same record shape in all three stacks, every input in the output, output
files that appear whole or not at all. Run directories and images are generated here."""
from __future__ import annotations

import csv
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.rundir import RUN_FORMAT
from data.errors import UserError
from core.predict import CSV_FIELDS, iter_image_paths
from tests.helpers import require, image_bytes, synthetic_image
from tests.helpers import assert_ok, assert_user_error, run
from tests.helpers import mlp_run

RECORD_KEYS = {"index", "path", "p_fake", "label", "resized", "original_size",
               "out_of_distribution", "ood_reason", "error"}


def cnn_run(d: Path) -> Path:
    torch = require("torch")
    from torch_cnn import checkpoint
    from torch_cnn.model import build_model
    torch.manual_seed(0)
    d.mkdir(parents=True)
    checkpoint.save(d / "model.safetensors", build_model("baseline"), "baseline")
    (d / "config.json").write_text(json.dumps({"run_format": RUN_FORMAT, "model": "baseline", "family": "cnn",
                                               "stack": "torch_cnn"}))
    return d


# (stack module, run builder): jax scores the MLP run, which compiles in a second
STACKS = [("numpy_mlp", mlp_run), ("torch_cnn", cnn_run), ("jax_port", mlp_run)]


def detector(stack: str, tmp_path: Path):
    if stack != "numpy_mlp":
        require("torch" if stack == "torch_cnn" else "jax")
    builder = dict(STACKS)[stack]
    mod = importlib.import_module(f"{stack}.predict")
    return mod.Detector.load(builder(tmp_path / f"run-{stack}"), device="cpu")


@pytest.fixture
def photos(tmp_path):
    """photos/{a.png, b.JPG (64x48), sub/c.webp, sub/.hidden/x.png, ._d.jpg, notes.txt}."""
    d = tmp_path / "photos"
    (d / "sub" / ".hidden").mkdir(parents=True)
    Image.fromarray(synthetic_image(1, 0)).save(d / "a.png")
    Image.fromarray(synthetic_image(0, 1, size=64)[:48]).save(d / "b.JPG", quality=95)
    Image.fromarray(synthetic_image(0, 2)).save(d / "sub" / "c.webp", lossless=True)
    Image.fromarray(synthetic_image(0, 3)).save(d / "sub" / ".hidden" / "x.png")
    (d / "._d.jpg").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS metadata, not an image
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.mark.parametrize("stack", [s for s, _ in STACKS])
def test_detector_same_shape_for_paths_pil_arrays_and_bytes(stack, tmp_path):
    det = detector(stack, tmp_path)
    img = synthetic_image(1, 4)
    png = tmp_path / "x.png"
    Image.fromarray(img).save(png)
    big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # 64x64
    inputs = [str(png), Path(png), Image.fromarray(img), img, png.read_bytes(),
              Image.fromarray(img).convert("RGBA"), big, img.astype(np.float32), 42,
              str(tmp_path / "missing.png")]
    recs = det.predict(inputs)
    assert [r["index"] for r in recs] == list(range(len(inputs)))
    assert all(set(r) == RECORD_KEYS for r in recs)
    ok, bad = recs[:7], recs[7:]
    p = ok[0]["p_fake"]
    assert 0.0 <= p <= 1.0
    # the same pixels score the same, however they are passed
    assert [r["p_fake"] for r in ok[:6]] == pytest.approx([p] * 6, abs=1e-6)
    assert all(r["label"] == ("FAKE" if r["p_fake"] >= 0.5 else "REAL") for r in ok)
    assert ok[0]["path"] == str(png) and ok[2]["path"] is None
    assert ok[6]["resized"] is True and ok[6]["original_size"] == [64, 64]
    assert not ok[0]["resized"] and ok[0]["original_size"] == [32, 32]
    assert all(r["p_fake"] is None and r["label"] is None for r in bad)
    assert "input 7" in bad[0]["error"] and "dtype float32" in bad[0]["error"]
    assert "input 8" in bad[1]["error"] and "unsupported type int" in bad[1]["error"]
    assert "missing.png" in bad[2]["error"]
    # one image, or a 4-D batch, is accepted as well as a list
    assert det.predict(img)[0]["p_fake"] == pytest.approx(p, abs=1e-6)
    batch = det.predict(np.stack([img] * 3))
    assert [r["index"] for r in batch] == [0, 1, 2]
    # the threshold decides the label, nothing else
    assert det.predict(img, threshold=0.0)[0]["label"] == "FAKE"
    assert det.predict(img, threshold=1.0)[0]["label"] == ("FAKE" if p >= 1.0 else "REAL")
    with pytest.raises(UserError, match="threshold"):
        det.predict(img, threshold=1.5)


def test_stacks_agree_on_the_same_mlp_run(tmp_path):
    require("jax")
    run_dir = mlp_run(tmp_path / "run")
    imgs = np.stack([synthetic_image(i % 2, i) for i in range(5)])
    from jax_port.predict import Detector as J
    from numpy_mlp.predict import Detector as N
    pn = [r["p_fake"] for r in N.load(run_dir).predict(imgs)]
    pj = [r["p_fake"] for r in J.load(run_dir, "cpu").predict(imgs)]
    assert pj == pytest.approx(pn, abs=1e-5)


def test_bounded_batches_keep_input_order(tmp_path):
    from numpy_mlp.predict import Detector
    det = Detector.load(mlp_run(tmp_path / "run"))
    seen = []
    score = det.p_fake_batch
    det.p_fake_batch = lambda b: (seen.append(len(b)), score(b))[1]
    inputs = [synthetic_image(0, i) if i % 4 else b"broken" for i in range(23)]
    recs = det.predict(inputs, batch_size=5)
    assert max(seen) <= 5 and sum(seen) == 17
    assert [r["index"] for r in recs] == list(range(23))
    assert [r["error"] is None for r in recs] == [bool(i % 4) for i in range(23)]


def test_folder_scan_is_recursive_sorted_and_skips_hidden_and_non_images(photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    got = [p if isinstance(p, str) else ("unreadable", p.path, p.message)
           for p in iter_image_paths([photos, photos / "notes.txt", empty])]
    assert got[:3] == [str(photos / "a.png"), str(photos / "b.JPG"),
                       str(photos / "sub" / "c.webp")]
    assert got[3] == str(photos / "notes.txt")  # named explicitly: tried, whatever its name
    assert got[4][:2] == ("unreadable", str(empty)) and "no image file" in got[4][2]
    assert len(got) == 5


def test_a_folder_that_cannot_be_listed_is_reported_wherever_it_is(tmp_path, monkeypatch):
    """os.walk reports an unlistable folder through its error callback; the last folder's
    error (after every readable one) used to be dropped, with exit 0, and an unlistable
    top folder was reported as 'holds no image file'. (os.scandir is made to fail,
    which is what a folder without read permission does for a user who is not root.)"""
    for sub in ("a", "z"):
        (tmp_path / "scan" / sub).mkdir(parents=True)
        (tmp_path / "scan" / sub / "1.png").write_bytes(image_bytes(synthetic_image(0, 1)))
    (tmp_path / "top").mkdir()
    denied = {str(tmp_path / "scan" / "z"), str(tmp_path / "top")}
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).rstrip("/") in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    got = [p if isinstance(p, str) else (p.path, p.message)
           for p in iter_image_paths([tmp_path / "scan", tmp_path / "top"])]
    assert got[0] == str(tmp_path / "scan" / "a" / "1.png")
    assert got[1][0] == str(tmp_path / "scan" / "z") and "cannot list folder" in got[1][1]
    assert got[2][0] == str(tmp_path / "top") and "cannot list folder" in got[2][1]
    assert len(got) == 3


@pytest.mark.parametrize("as_json", [False, True])
def test_standard_output_that_cannot_be_written_is_one_line(as_json, photos, tmp_path):
    """A full disk behind stdout, and a reader that goes away (``| head``), used to end in
    a traceback."""
    import subprocess
    from tests.helpers import cmd, env
    r = mlp_run(tmp_path / "run")
    argv = cmd("numpy_mlp.predict", "--run", r, photos, *(["--json"] if as_json else []))
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            p = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, env=env(),
                               timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert "cannot write the results to standard output (No space left" in p.stderr
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env())
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith("standard output was closed before "
                                                 "everything was written")


@pytest.mark.parametrize("fmt", [".csv", ".jsonl"])
def test_a_file_name_that_is_not_utf8_is_written_as_a_path_that_opens(fmt, tmp_path):
    """The CSV writer used to fail on such a name (a traceback, no file); the CSV row holds
    the name's own bytes, the JSONL row its os.fsdecode form: either opens the file."""
    r = mlp_run(tmp_path / "run")
    (tmp_path / "in").mkdir()
    name = os.fsdecode(b"\xffphoto.png")
    Image.fromarray(synthetic_image(1, 0)).save(tmp_path / "in" / name, format="PNG")
    out = tmp_path / f"scores{fmt}"
    assert_ok(run("numpy_mlp.predict", "--run", r, tmp_path / "in", "--output", out))
    if fmt == ".csv":
        row = out.read_bytes().splitlines()[1]
        path = os.fsdecode(row.split(b",")[1])
    else:
        path = json.loads(out.read_text().splitlines()[0])["path"]
    assert path == str(tmp_path / "in" / name) and Path(path).is_file()


@pytest.mark.parametrize("fmt", [".csv", ".jsonl"])
def test_predict_cli_writes_every_input_to_the_output_file(fmt, photos, tmp_path):
    r = mlp_run(tmp_path / "run")
    out = tmp_path / f"scores{fmt}"
    p = run("numpy_mlp.predict", "--run", r, photos, tmp_path / "missing.jpg", "--output", out,
            "--threshold", "0.3", "--device", "cpu", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr  # one input failed
    assert "wrote 4 row(s)" in p.stdout and "3 scored, 1 failed" in p.stdout
    assert "missing.jpg" in p.stderr
    if fmt == ".csv":
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == list(CSV_FIELDS)
        labels = [row["label"] for row in rows]
        p_fake = [float(row["p_fake"]) if row["p_fake"] else None for row in rows]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(set(row) == RECORD_KEYS for row in rows)
        labels = [row["label"] or "" for row in rows]
        p_fake = [row["p_fake"] for row in rows]
    assert [Path(row["path"]).name for row in rows] == ["a.png", "b.JPG", "c.webp",
                                                        "missing.jpg"]
    assert "cannot read" in rows[3]["error"] and p_fake[3] is None and labels[3] == ""
    assert labels[:3] == ["FAKE" if q >= 0.3 else "REAL" for q in p_fake[:3]]
    assert not list(tmp_path.glob(".scores*"))  # no temp file left behind


def test_predict_output_is_all_or_nothing(photos, tmp_path):
    r = mlp_run(tmp_path / "run")
    out = tmp_path / "scores.csv"
    out.write_text("previous\n")
    # a refusal after the output was opened (bad --device for this stack) leaves it intact
    p = run("numpy_mlp.predict", "--run", r, photos, "--output", out, "--device", "gpu",
            cwd=tmp_path)
    assert_user_error(p, "--device gpu", "CPU only")
    assert out.read_text() == "previous\n" and not list(tmp_path.glob(".scores*"))
    assert_user_error(run("numpy_mlp.predict", "--run", r, photos, "--output",
                          tmp_path / "s.txt", cwd=tmp_path), "s.txt", ".csv or FILE.jsonl")
    assert_user_error(run("numpy_mlp.predict", "--run", r, photos, "--output",
                          tmp_path / "no-dir" / "s.csv", cwd=tmp_path), "no-dir/s.csv")
    assert_user_error(run("numpy_mlp.predict", "--run", r, photos, "--threshold", "nan",
                          cwd=tmp_path), "threshold", "nan")
    assert_user_error(run("numpy_mlp.predict", "--run", r, photos, "--device", "tpu",
                          cwd=tmp_path), "tpu", "auto, cpu or gpu")


def test_predict_cli_text_and_json_include_folders(photos, tmp_path):
    r = mlp_run(tmp_path / "run")
    p = run("numpy_mlp.predict", "--run", r, photos, cwd=tmp_path)
    assert_ok(p)
    lines = p.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == [str(photos / n) for n in
                                               ("a.png", "b.JPG", "sub/c.webp")]
    assert "out of distribution: shrunk from 64x48 to 32x32 after cropping" in lines[1]
    p = run("numpy_mlp.predict", "--run", r, photos, "--json", "--device", "CUDA", cwd=tmp_path)
    assert_user_error(p, "--device gpu")  # cuda = gpu, and NumPy has none
    p = run("numpy_mlp.predict", "--run", r, photos, "--json", "--device", "auto", cwd=tmp_path)
    assert_ok(p)
    assert [Path(x["path"]).name for x in json.loads(p.stdout)] == ["a.png", "b.JPG", "c.webp"]


def test_predict_help_shows_defaults_and_an_example():
    p = run("torch_cnn.predict", "--help")
    assert_ok(p)
    assert "(default: 0.5)" in p.stdout and "(default: auto)" in p.stdout
    assert "example:" in p.stdout and "--output scores.csv" in p.stdout
    p = run("torch_cnn.predict", "--version")
    assert_ok(p)
    assert p.stdout.split()[-1][0].isdigit() or "unknown" in p.stdout
