"""Files from the internet: nothing the tool loads can run code, and every loaded
tensor is checked before use.

- A source scan (AST + tokens, so comments and docstrings don't count) fails on any
  unpickling path: pickle & friends, ``torch.load`` without ``weights_only=True``,
  ``np.load`` without ``allow_pickle=False``, ``allow_pickle=True``, ``yaml.load``,
  ``eval(``/``exec(``. The scanner is itself tested on known-bad snippets.
- A pickle bomb (whose unpickling would create a marker file) saved under every file
  name a run directory holds is refused by ``--resume`` and by ``predict`` (exit 2, one
  line) and the marker never appears.
- Every stack's checkpoint loader rejects a wrong shape, an extra or missing tensor and
  a wrong dtype with a one-line UserError naming the tensor.
- Archives are decoded in memory (nothing extracted to disk) and image decoding is
  bounded (PIL's MAX_IMAGE_PIXELS set; a bomb is refused by predict too, and so is a
  large picture nested in a small-looking container).
- A file name cannot become a spreadsheet formula in predict's CSV.
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import shutil
import struct
import tokenize
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import require, REPO, image_bytes, make_archive, synthetic_image
from tests.helpers import (RUN_FILES, assert_ok, assert_user_error, last_line, run,
                           trusted_caches)

SCANNED = ("numpy_mlp", "torch_cnn", "jax_port", "data", "core", "bench", "cifake")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal",
                  "joblib"}
NUMPY_NAMES = {"np", "numpy", "jnp", "onp"}


# ------------------------------------------------------------------ the scanner
def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(text: str, where: str = "<src>") -> list[str]:
    """Unpickling / code-execution paths in Python source ``text`` (code only)."""
    bad = []
    tree = ast.parse(text, where)
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    bad.append(f"{line}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            names = {a.name for a in node.names}
            if mod in PICKLE_MODULES:
                bad.append(f"{line}: from {node.module} import ...")
            if mod == "torch" and "load" in names:
                bad.append(f"{line}: from torch import load")
            if mod == "yaml" and names & {"load", "unsafe_load", "full_load"}:
                bad.append(f"{line}: from yaml import load")
            if mod in ("numpy",) and "load" in names:
                bad.append(f"{line}: from numpy import load (use np.load(..., allow_pickle=False))")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
                bad.append(f"{line}: {f.id}(")
            if isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else None
                if owner == "torch" and f.attr == "load" and \
                        not _is_const(_kw(node, "weights_only"), True):
                    bad.append(f"{line}: torch.load without weights_only=True")
                if owner in NUMPY_NAMES and f.attr == "load" and \
                        not _is_const(_kw(node, "allow_pickle"), False):
                    bad.append(f"{line}: {owner}.load without allow_pickle=False")
                if owner == "yaml" and f.attr in ("load", "unsafe_load", "full_load"):
                    bad.append(f"{line}: yaml.{f.attr}")
                if f.attr in ("read_pickle", "to_pickle"):
                    bad.append(f"{line}: .{f.attr}(")
                if owner == "builtins" and f.attr in ("eval", "exec"):
                    bad.append(f"{line}: builtins.{f.attr}(")
            ap = _kw(node, "allow_pickle")
            if ap is not None and not _is_const(ap, False):
                bad.append(f"{line}: allow_pickle={ast.unparse(ap)}")
    # token pass: any code mention of a pickle module (e.g. getattr tricks, aliases)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME and tok.string in PICKLE_MODULES | {"__reduce__"}:
            bad.append(f"{where}:{tok.start[0]}: name '{tok.string}' in code")
    return sorted(set(bad))


def project_sources() -> list[Path]:
    return sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))


def test_no_load_path_unpickles_or_evaluates():
    files = project_sources()
    assert len(files) >= 20, "scanned suspiciously few files"
    found = []
    for p in files:
        found += scan_source(p.read_text(), str(p.relative_to(REPO)))
    assert found == [], "unsafe load paths:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import pickle\n", "from pickle import loads\n", "import dill as d\n",
    "import torch\ntorch.load(f)\n", "torch.load(f, weights_only=False)\n",
    "np.load(p)\n", "np.load(p, allow_pickle=True)\n", "numpy.load(p, allow_pickle=ok)\n",
    "jnp.load(p)\n", "yaml.load(s)\n", "eval('1+1')\n", "exec(code)\n",
    "from torch import load\n", "df = pd.read_pickle(p)\n",
    "x = __import__('pickle')\n",
])
def test_scanner_catches_each_unsafe_pattern(snippet):
    assert scan_source(snippet), f"scanner missed: {snippet!r}"


@pytest.mark.parametrize("snippet", [
    "model.eval()\n", "np.load(p, allow_pickle=False)\n",
    "torch.load(f, weights_only=True)\n", "# import pickle\n", "'''never pickle'''\n",
    "x = 'eval(1)'\n", "yaml.safe_load(s)\n",
])
def test_scanner_passes_safe_code(snippet):
    assert scan_source(snippet) == []


# ------------------------------------------------------------------ pickle bombs
class _Bomb:
    """Unpickling this runs ``open(marker, 'w')``: the marker's existence = code ran."""
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _ShellBomb:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def bomb_variants(marker: Path) -> dict[str, bytes]:
    raw = pickle.dumps(_Bomb(marker), protocol=2)
    # torch.save's format: a zip whose archive/data.pkl is the pickle
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_ShellBomb(marker), protocol=2))
        z.writestr("archive/version", "3\n")
    return {"raw_pickle": raw, "torch_save_zip": buf.getvalue(),
            "pickle_protocol0": pickle.dumps(_ShellBomb(marker), protocol=0)}


def test_the_bombs_are_live(tmp_path):
    """Guard against a test that cannot fail: unpickling each bomb DOES create the marker."""
    marker = tmp_path / "marker"
    for name, b in bomb_variants(marker).items():
        if name == "torch_save_zip":
            b = zipfile.ZipFile(io.BytesIO(b)).read("archive/data.pkl")
        pickle.loads(b)  # noqa: S301 -- deliberately, on our own bytes, to prove the bomb works
        assert marker.exists(), name
        marker.unlink()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("untrusted")
    zp = make_archive(d / "tiny.zip")
    out = d / "mlp"
    p = run("numpy_mlp.train", "--data", zp, "--cache-dir", d / "cache", "--out", out,
            "--epochs", 2, "--batch-size", 4, "--no-progress")
    assert_ok(p)
    img = d / "img.png"
    img.write_bytes(image_bytes(synthetic_image(1, 7), "PNG"))
    return {"dir": d, "zip": zp, "cache": d / "cache", "mlp": out, "img": img}


def _plant(src: Path, dst: Path, name: str, payload: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / name).write_bytes(payload)
    return dst


# files --resume reads (numpy_mlp) and files predict reads
RESUME_READS = ("state.safetensors", "state.json", "metrics.json", "config.json")
PREDICT_READS = ("model.safetensors", "config.json")


@pytest.mark.parametrize("variant", ["raw_pickle", "torch_save_zip", "pickle_protocol0"])
@pytest.mark.parametrize("name", RUN_FILES)
def test_numpy_resume_refuses_pickle_bombs(name, variant, runs_dir, tmp_path):
    marker = tmp_path / "PWNED"
    r = _plant(runs_dir["mlp"], tmp_path / "run", name, bomb_variants(marker)[variant])
    p = run("numpy_mlp.train", "--cache-dir", runs_dir["cache"],
            "--out", r, "--resume", "--epochs", 3, "--no-progress")
    assert not marker.exists(), "unpickling ran foreign code"
    if name in RESUME_READS:
        assert_user_error(p, name)
    else:  # model.safetensors is only written by --resume: it must be replaced, never read
        assert_ok(p)
        from safetensors.numpy import load_file
        assert set(load_file(str(r / name))) == {"W1", "b1", "W2", "b2"}


@pytest.mark.parametrize("variant", ["raw_pickle", "torch_save_zip"])
@pytest.mark.parametrize("name", PREDICT_READS)
def test_numpy_predict_refuses_pickle_bombs(name, variant, runs_dir, tmp_path):
    marker = tmp_path / "PWNED"
    r = _plant(runs_dir["mlp"], tmp_path / "run", name, bomb_variants(marker)[variant])
    p = run("numpy_mlp.predict", "--run", r, runs_dir["img"])
    assert_user_error(p, name)
    assert not marker.exists()


@pytest.mark.parametrize("name", PREDICT_READS)
def test_jax_predict_refuses_pickle_bombs(name, runs_dir, tmp_path):
    marker = tmp_path / "PWNED"
    r = _plant(runs_dir["mlp"], tmp_path / "run", name, bomb_variants(marker)["raw_pickle"])
    p = run("jax_port.predict", "--run", r, runs_dir["img"])
    assert_user_error(p, name)
    assert not marker.exists()


@pytest.fixture(scope="module")
def torch_run(runs_dir):
    require("torch")
    out = runs_dir["dir"] / "cnn"
    assert_ok(run("torch_cnn.train", "--data", runs_dir["zip"], "--cache-dir", runs_dir["cache"],
                  "--out", out, "--epochs", 1, "--batch-size", 4, "--no-progress",
                  "--device", "cpu"))
    return out


@pytest.mark.parametrize("name", PREDICT_READS)
def test_torch_predict_refuses_pickle_bombs(name, torch_run, runs_dir, tmp_path):
    marker = tmp_path / "PWNED"
    r = _plant(torch_run, tmp_path / "run", name, bomb_variants(marker)["torch_save_zip"])
    p = run("torch_cnn.predict", "--run", r, runs_dir["img"])
    assert_user_error(p, name)
    assert not marker.exists()


@pytest.mark.parametrize("stack", ["torch_cnn", "jax_port"])
def test_torch_and_jax_resume_refuse_a_pickled_state(stack, torch_run, runs_dir, tmp_path):
    """A trained run whose state.safetensors was swapped for a torch.save-style pickle
    (jax_port resumes the torch run's twin: its own MLP run, trained here)."""
    if stack == "torch_cnn":
        out = shutil.copytree(torch_run, tmp_path / "run")
    else:
        out = tmp_path / "run"
        assert_ok(run("jax_port.train", "--data", runs_dir["zip"], "--cache-dir",
                      runs_dir["cache"], "--out", out, "--epochs", 1, "--batch-size", 4,
                      "--no-progress", "--model", "mlp2"))
    marker = tmp_path / "PWNED"
    (out / "state.safetensors").write_bytes(bomb_variants(marker)["torch_save_zip"])
    p = run(f"{stack}.train", "--cache-dir", runs_dir["cache"],
            "--out", out, "--epochs", 2, "--resume", "--no-progress")
    assert_user_error(p, "state.safetensors")
    assert not marker.exists()


# ------------------------------------------------------------------ checkpoint validation
def _mlp(dims=(3072, 7, 1), dtype=np.float32):
    t = {}
    for l in range(1, len(dims)):
        t[f"W{l}"] = np.zeros((dims[l], dims[l - 1]), dtype)
        t[f"b{l}"] = np.zeros((dims[l], 1), dtype)
    return t


MLP_META = {"family": "mlp", "model": "mlp2", "layer_dims": "[3072, 7, 1]"}


def _mutations(tensors: dict, key: str, wrong_shape: tuple) -> dict[str, tuple[dict, str]]:
    """name -> (mutated tensors, word the error must contain)."""
    shape = dict(tensors)
    shape[key] = np.zeros(wrong_shape, tensors[key].dtype)
    extra = dict(tensors, sneaky=np.zeros(3, np.float32))
    missing = {k: v for k, v in tensors.items() if k != key}
    dtype = dict(tensors)
    dtype[key] = tensors[key].astype(np.float16)
    return {"wrong_shape": (shape, key), "extra_tensor": (extra, "sneaky"),
            "missing_tensor": (missing, key), "wrong_dtype": (dtype, key)}


@pytest.mark.parametrize("mutation", ["wrong_shape", "extra_tensor", "missing_tensor",
                             "wrong_dtype"])
def test_mlp_checkpoint_loaders_validate_every_tensor(mutation, tmp_path):
    from data.errors import UserError
    from core.tensors import save_safetensors
    from numpy_mlp import checkpoint as np_ckpt
    tensors, word = _mutations(_mlp(), "W2", (1, 8))[mutation]
    path = tmp_path / "model.safetensors"
    save_safetensors(path, tensors, MLP_META)
    with pytest.raises(UserError) as e:
        np_ckpt.load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and word in msg, msg


@pytest.mark.parametrize("mutation", ["wrong_shape", "extra_tensor", "missing_tensor",
                             "wrong_dtype"])
def test_cnn_checkpoint_loaders_validate_every_tensor(mutation, tmp_path):
    require("torch")
    from data.errors import UserError
    from core.tensors import save_safetensors
    from torch_cnn import checkpoint as t_ckpt
    from torch_cnn.model import init_model
    good = {k: v for k, v in t_ckpt.state_to_numpy(init_model("v3", 0)).items()}
    tensors, word = _mutations(good, "bn2.running_var", (32,))[mutation]
    path = tmp_path / "model.safetensors"
    save_safetensors(path, tensors, {"family": "cnn", "model": "v3"})
    with pytest.raises(UserError) as e:
        t_ckpt.load_into(path, init_model("v3", 0))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and word in msg, msg


@pytest.mark.parametrize("family", ["mlp", "cnn"])
@pytest.mark.parametrize("mutation", ["wrong_shape", "extra_tensor", "missing_tensor",
                             "wrong_dtype"])
def test_jax_checkpoint_loader_validates_every_tensor(family, mutation, tmp_path):
    """jax_port.checkpoint.load (what jax_port.predict and evaluation use), in-process."""
    require("jax")
    from data.errors import UserError
    from core.tensors import save_safetensors
    from jax_port import checkpoint as j_ckpt
    if family == "mlp":
        tensors, word = _mutations(_mlp(), "W1", (7, 3000))[mutation]
        meta, model = MLP_META, "mlp2"
    else:
        shapes = {"conv1.weight": (32, 3, 3, 3), "conv1.bias": (32,),
                  "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,),
                  "fc1.weight": (512, 4096), "fc1.bias": (512,), "fc2.weight": (1, 512),
                  "fc2.bias": (1,)}
        good = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
        tensors, word = _mutations(good, "fc1.weight", (512, 4095))[mutation]
        meta, model = {"family": "cnn", "model": "baseline"}, "baseline"
    path = tmp_path / "model.safetensors"
    save_safetensors(path, tensors, meta)
    with pytest.raises(UserError) as e:
        j_ckpt.load(path, model)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and word in msg, msg


# ------------------------------------------------------------------ archives & decoding
def test_archive_members_are_never_extracted(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    zp = make_archive(tmp_path / "tiny.zip", n_train=5, n_test=2)
    p = run("data.prepare", "--data", zp, "--cache-dir", tmp_path / "cache", cwd=work)
    assert_ok(p)
    [cache] = trusted_caches(tmp_path / "cache")
    assert sorted(f.name for f in cache.iterdir()) == sorted(
        ["manifest.json"] + [f"{s}_{k}.npy" for s in ("train", "test")
                             for k in ("images", "labels", "cifar_class", "digests", "names")])
    assert list(work.iterdir()) == []
    everything = [f.relative_to(tmp_path) for f in tmp_path.rglob("*") if f.is_file()]
    assert not [f for f in everything if f.suffix.lower() in (".jpg", ".jpeg", ".png")], everything


@pytest.mark.parametrize("module", ["numpy_mlp.predict", "jax_port.predict", "torch_cnn.predict",
                           "data.prepare"])
def test_image_decoding_is_bounded_in_every_entry_point(module):
    code = (f"import {module}, PIL.Image as I, data.images as d; "
            "print(I.MAX_IMAGE_PIXELS, d.MAX_PIXELS)")
    import subprocess
    import sys
    from tests.helpers import env
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got, want = map(int, p.stdout.split())
    assert got == want and 0 < got <= 100_000_000  # set, and at most 100 Mpx


def test_predict_refuses_a_decompression_bomb_without_allocating(runs_dir, tmp_path):
    """A 70-byte PNG declaring 100000x100000 px: refused from its header, fast, exit 1."""
    from tests.helpers import png_bomb
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())
    p = run("numpy_mlp.predict", "--run", runs_dir["mlp"], bomb, runs_dir["img"], timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "decompression bomb" in last_line(p.stderr) and str(bomb) in last_line(p.stderr)
    assert str(runs_dir["img"]) in p.stdout  # the good image was still scored


def _icns(png: bytes, kind: bytes = b"ic10") -> bytes:
    """A macOS icon file holding one PNG; its type code (ic10) declares 1024x1024."""
    entry = kind + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


@pytest.mark.parametrize("where", ["file", "bytes"])
def test_a_picture_nested_in_an_icon_is_held_to_the_pixel_cap(where, tmp_path):
    """An ICNS declares 1024x1024 in its header and may hold an 8000x8000 PNG (64 Mpx, over
    the 40 Mpx cap): Pillow only warned, and the PNG was decoded. The cap now holds for
    every picture decoded and for the size it decodes to. (A 100-byte PNG header stands in
    for the picture: refused before any pixel is decoded.)"""
    from data.errors import DataError
    from data.images import load_image_bytes, load_image_for_model
    from tests.helpers import png_bomb
    data = _icns(png_bomb(8000, 8000))
    f = tmp_path / "icon.icns"
    f.write_bytes(data)
    with pytest.raises(DataError, match=r"too many pixels.*decompression bomb refused") as e:
        load_image_for_model(str(f)) if where == "file" else load_image_bytes(data, "upload")
    assert str(e.value).startswith(str(f) if where == "file" else "upload")


# ------------------------------------------------------------------ spreadsheets
def test_csv_cells_that_look_like_formulas_are_neutralised(tmp_path):
    """A file named '=HYPERLINK(...).jpg' put its name verbatim into predict's CSV, where a
    spreadsheet runs it as a formula. Every text cell beginning with =, +, -, @, a tab or a
    carriage return now starts with ' (OWASP), in the path and the error columns alike."""
    import csv
    from tests.helpers import mlp_run
    r = mlp_run(tmp_path / "run")
    good = "=HYPERLINK(\"evil\",\"x\").jpg"
    (tmp_path / good).write_bytes(image_bytes(synthetic_image(1, 0)))
    (tmp_path / "@SUM(1+1).jpg").write_bytes(b"not an image")
    (tmp_path / "\tx.jpg").write_bytes(b"not an image")
    out = tmp_path / "scores.csv"
    p = run("numpy_mlp.predict", "--run", r, good, "@SUM(1+1).jpg", "\tx.jpg", "--output", out,
            cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    rows = list(csv.DictReader(out.open(newline="")))
    assert [row["path"] for row in rows] == ["'" + good, "'@SUM(1+1).jpg", "'\tx.jpg"]
    assert rows[0]["error"] == "" and rows[0]["label"] in ("FAKE", "REAL")
    assert rows[1]["error"].startswith("'@SUM(1+1).jpg: not a readable image")
    assert rows[2]["error"].startswith("\\tx.jpg: not a readable image")  # escaped: text
    for row in rows:
        assert not any(v.startswith(("=", "+", "-", "@", "\t", "\r")) for v in row.values())
