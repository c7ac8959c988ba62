"""Tiny CIFAKE-shaped archives for tests, generated on the fly (never committed)."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

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
    pytest.skip(reason)


def require_modules(*names: str, extra: str) -> None:
    """Skip (or fail in CI) unless every module in ``names`` imports."""
    import importlib.util
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed (pip install -e \".[{extra}]\")")
