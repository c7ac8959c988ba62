"""What the tests share: tiny CIFAKE-shaped archives generated on the fly (never
committed), train command lines, and running the REAL entry points (``python -m ...``)
in subprocesses the way a user does, judging only what a user sees: the exit status,
stderr's last line, and what is left on disk."""
from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.rundir import RUN_FORMAT

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cifake"
MINI_ZIP = SHARED_DATA / "cifake-mini.zip"
FULL_ZIP = SHARED_DATA / "cifake.zip"


def image_bytes(rgb: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    im = Image.fromarray(np.asarray(rgb, np.uint8))
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def synthetic_image(label: int, i: int, size: int = 32) -> np.ndarray:
    """A learnable toy: REAL (1) images are bright on the left, FAKE (0) on the right."""
    rng = np.random.default_rng(1000 * label + i)
    img = rng.integers(0, 80, size=(size, size, 3))
    half = slice(0, size // 2) if label == 1 else slice(size // 2, size)
    img[:, half] += 150
    return np.clip(img, 0, 255).astype(np.uint8)


def make_archive(path: str | os.PathLike, n_train: int = 6, n_test: int = 3,
                 extra: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
                 fmt: str = "JPEG", quality: int = 95) -> Path:
    """A zip in the Kaggle layout with ``n_train``/``n_test`` images per class.

    ``extra`` adds or replaces members (name -> bytes); ``drop`` removes members
    whose name starts with one of the prefixes. File names follow CIFAKE's
    'N (k).jpg' convention.
    """
    members: dict[str, bytes] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(("FAKE", "REAL")):
            for i in range(n):
                k = i % 10 + 1
                name = f"{i}.jpg" if k == 1 else f"{i} ({k}).jpg"
                seed_i = i + (0 if split == "train" else 10_000)
                members[f"{split}/{cls}/{name}"] = image_bytes(
                    synthetic_image(label, seed_i), fmt=fmt, quality=quality)
    members.update(extra or {})
    members = {k: v for k, v in members.items() if not k.startswith(drop)}
    path = Path(path)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def extract_to(zip_path: Path, folder: Path) -> Path:
    """Test helper only: unpack a *generated* archive to exercise the folder source."""
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(folder)
    return folder


# CI sets this (.ci/run): there the optional parts (the export and demo extras, the
# browser test's Chromium + Playwright) are installed, so a missing one must fail the
# suite instead of skipping it silently.
REQUIRE_OPTIONAL_ENV = "CIFAKE_REQUIRE_OPTIONAL"


def skip_or_fail(reason: str) -> None:
    """pytest.skip(reason), except in CI where the skip would hide a broken set-up."""
    import pytest
    if os.environ.get(REQUIRE_OPTIONAL_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_OPTIONAL_ENV}=1: required here)")
    pytest.skip(reason, allow_module_level=True)


def require_modules(*names: str, extra: str) -> None:
    """Skip (or fail in CI) unless every module in ``names`` imports."""
    import importlib.util
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed (pip install -e \".[{extra}]\")")


EXTRA_OF = {"torch": "torch", "torchvision": "torch", "jax": "jax", "flax": "jax",
            "optax": "jax", "onnx": "export", "onnxruntime": "export", "onnxscript": "export",
            "tensorflow_datasets": "tfds", "playwright": "test", "starlette": "demo"}


def require(name: str):
    """``import name``, or skip (fail in CI) when it is not installed: the one way a test
    depends on an optional extra (``pytest.importorskip`` would skip silently in CI too)."""
    import importlib
    require_modules(name, extra=EXTRA_OF.get(name, "all"))
    return importlib.import_module(name)


def train_argv(data, cache, out, *extra, fresh=()) -> list[str]:
    """A ``train`` command line. With ``--resume`` in ``extra`` it holds only what a resume
    may be given (the run's config.json fixes the rest); otherwise ``--data`` and the
    ``fresh`` flags come first, then ``extra``."""
    base = ["--cache-dir", str(cache), "--out", str(out), "--no-progress"]
    if "--resume" in map(str, extra):
        return base + [str(a) for a in extra]
    return ["--data", str(data), *base, *map(str, fresh), *map(str, extra)]


# ------------------------------------------------------------------ entry points
PY = sys.executable
# One BLAS/OpenMP thread per subprocess: the machine has 2 shared cores, and results are
# compared only between runs made with the same setting.
_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
NOBODY = 65534
RUN_FILES = ("config.json", "metrics.json", "model.safetensors", "state.safetensors",
             "state.json")


def env(**extra) -> dict:
    e = dict(os.environ, **_ENV)
    e.pop("CIFAKE_FAULT_KILL_IN_WRITE", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def cmd(module: str, *args, user: int | None = None) -> list[str]:
    base = [PY, "-m", module, *map(str, args)]
    if user is not None:
        base = [shutil.which("setpriv"), f"--reuid={user}", f"--regid={user}",
                "--clear-groups", *base]
    return base


def run(module: str, *args, cwd=None, timeout: float = 240, user: int | None = None,
        **extra_env) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` to completion, capturing text output."""
    return subprocess.run(cmd(module, *args, user=user), cwd=cwd or REPO, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def start(module: str, *args, cwd=None, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(cmd(module, *args), cwd=cwd or REPO, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_user_error(p: subprocess.CompletedProcess, *needles: str, rc: int | None = 2) -> str:
    """The contract for an expected failure: nonzero exit (``rc`` when given), no
    traceback, stderr's last line starts with 'error:' and names each needle."""
    where = f"exit {p.returncode}\n--- stderr ---\n{p.stderr[-3000:]}"
    assert p.returncode != 0, "expected a failure; " + where
    if rc is not None:
        assert p.returncode == rc, where
    assert "Traceback" not in p.stderr, where
    line = last_line(p.stderr)
    assert line.startswith("error:"), where
    for n in needles:
        assert n.lower() in line.lower(), f"{n!r} not named in {line!r}"
    return line


def assert_ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0 and "Traceback" not in p.stderr, \
        f"exit {p.returncode}\n{p.stderr[-3000:]}"


def trusted_caches(cache_dir: Path) -> list[Path]:
    """Cache folders a later run would load (those with a manifest.json)."""
    if not cache_dir.exists():
        return []
    return [d for d in cache_dir.iterdir() if (d / "manifest.json").is_file()]


def assert_no_trusted_run(out: Path) -> None:
    for f in ("metrics.json", "model.safetensors"):
        assert not (out / f).exists(), f"{out / f} left behind by a failed run"


def can_drop_privileges() -> bool:
    """True when we can run a child as the unprivileged user 'nobody' (setpriv as root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    p = subprocess.run(cmd("data.prepare", "--help", user=NOBODY), cwd="/", env=env(),
                       capture_output=True, text=True, timeout=60)
    return p.returncode == 0


def world_tmpdir() -> Path:
    """A temp dir every user can traverse (pytest's tmp_path is root-only, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="cifake-rel-", dir="/tmp"))
    d.chmod(0o755)
    return d


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """A checkpoint's tensors, read with safetensors (raises on a half-written file)."""
    from safetensors.numpy import load_file
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]), \
            f"{k} differs between {a} and {b} (max |diff| " \
            f"{np.max(np.abs(wa[k].astype(np.float64) - wb[k].astype(np.float64)))})"


def assert_run_files_whole(out: Path) -> None:
    """Every run file that exists is complete: JSON parses, safetensors load."""
    for f in RUN_FILES:
        p = out / f
        if not p.exists():
            continue
        if f.endswith(".json"):
            json.loads(p.read_text())
        else:
            load_weights(p)


def state_epoch(out: Path) -> int:
    try:
        return int(json.loads((out / "state.json").read_text())["epoch_completed"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_epoch(proc: subprocess.Popen, out: Path, epoch: int, timeout: float = 180) -> bool:
    """Poll (5 ms) until state.json says >= ``epoch`` completed; False if the process ended."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if state_epoch(out) >= epoch:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"{out}: epoch {epoch} not reached in {timeout} s")


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


# ------------------------------------------------------------------ parity comparison
# ``assert_close_tree`` compares two dicts of arrays (canonical names, e.g. torch
# ``state_dict`` keys or numpy_mlp's ``W1``/``dW1``) and, on failure, says which tensor
# differs and by how much -- the parity suite's failure message.
def assert_close_tree(a, b, tol: float, what: str, relative: bool = True) -> float:
    """Every leaf of ``a`` within ``tol`` of ``b``'s (``bench.speed.parity.max_diffs``, the
    comparison the bench's parity checks make too). ``relative``: the error is max |a - b|
    divided by max |b| of that tensor; otherwise absolute. Returns the worst error seen."""
    from bench.speed.parity import max_diffs
    diffs = max_diffs(a, b)
    kind = "relative (to the tensor's max |value|)" if relative else "absolute"
    bad = {k: v for k, v in diffs.items() if v[1 if relative else 0] > tol}
    if bad:
        lines = [f"  {k}: max abs diff {d:.3e}, relative {r:.3e}" for k, (d, r) in sorted(bad.items())]
        raise AssertionError(f"{what}: {len(bad)} tensor(s) differ by more than {tol:g} "
                             f"{kind}:\n" + "\n".join(lines))
    return max((v[1 if relative else 0] for v in diffs.values()), default=0.0)


# ------------------------------------------------------------------ runs and console commands
def mlp_run(d: Path, nan: bool = False) -> Path:
    """A minimal valid NumPy-MLP run directory (no training needed to score images)."""
    from numpy_mlp import checkpoint
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    params = {"W1": rng.normal(0, 0.01, (7, 3072)).astype(np.float32),
              "b1": np.zeros((7, 1), np.float32),
              "W2": rng.normal(0, 0.1, (1, 7)).astype(np.float32), "b2": np.zeros((1, 1), np.float32)}
    if nan:
        params["W1"][3, 5] = np.nan
    checkpoint.save(d / "model.safetensors", params, "mlp2", [3072, 7, 1])
    (d / "config.json").write_text(json.dumps({"run_format": RUN_FORMAT, "stack": "numpy_mlp",
                                               "model": "mlp2", "layer_dims": [3072, 7, 1]}))
    return d


def _scripts() -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the console-script tests skip
        return {}
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


SCRIPTS = _scripts()


def call(name: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    module, func = SCRIPTS[name].split(":")
    entry = getattr(importlib.import_module(module), func)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as e:
        entry()
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header declares width x height RGB pixels (10 Gpx by
    default, 30 GB decoded). Crafted by hand: nothing large is ever allocated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
