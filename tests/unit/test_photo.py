"""data.photo (the documented preprocessing for photos), the statistic of bench.photo.study,
and cifake.realworld end to end on a generated run (skipped without scikit-image)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.rundir import RUN_FORMAT
from tests.helpers import require, require_modules
from PIL import Image

from data import photo
from data.photo import (CIFAKE_JPEG_QUALITY, FILTERS, PIPELINE, PIPELINE_FILTER,
                        PIPELINE_JPEG_QUALITY, centre_square, is_out_of_distribution, shrink,
                        to_cifake_32)


def _photo(w=200, h=120, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


# ------------------------------------------------------------------ to_cifake_32
@pytest.mark.parametrize("size", [(200, 120), (33, 500), (31, 31), (1, 1), (4000, 3000)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16"])
def test_to_cifake_32_any_size_and_mode_gives_uint8_32x32_rgb(size, mode):
    im = Image.new("RGB", size, (10, 200, 30)).convert(mode)
    out = to_cifake_32(im)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_to_cifake_32_is_the_documented_pipeline():
    im = _photo()
    assert np.array_equal(to_cifake_32(im), shrink(im, PIPELINE_FILTER, PIPELINE_JPEG_QUALITY))
    assert PIPELINE_FILTER in FILTERS and PIPELINE_FILTER in PIPELINE
    assert PIPELINE_JPEG_QUALITY == CIFAKE_JPEG_QUALITY and "75" in PIPELINE


def test_to_cifake_32_is_deterministic_and_leaves_32x32_alone():
    im = _photo()
    assert np.array_equal(to_cifake_32(im), to_cifake_32(im))
    small = np.asarray(_photo(32, 32))
    # A 32x32 input may be a CIFAKE file (already JPEG q75): not recompressed.
    assert np.array_equal(to_cifake_32(Image.fromarray(small)), small)


def test_centre_square_crops_the_middle():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255
    sq = np.asarray(centre_square(Image.fromarray(arr)))
    assert sq.shape == (10, 10, 3) and (sq == 255).all()
    tall = centre_square(Image.new("RGB", (7, 21)))
    assert tall.size == (7, 7)


def test_shrink_without_crop_keeps_the_whole_picture():
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :32] = 255  # the left third is white
    cropped = shrink(Image.fromarray(arr), "box")
    squashed = shrink(Image.fromarray(arr), "box", crop=False)
    assert cropped.max() == 0  # the centre square is all black
    assert squashed[:, :10].min() == 255


def test_cifake_quality_gives_the_tables_measured_on_cifake():
    from bench.photo.study import pillow_tables
    luma, chroma = pillow_tables(CIFAKE_JPEG_QUALITY)
    assert luma[:8] == (8, 6, 5, 8, 12, 20, 26, 31)  # CIFAKE's, both classes
    assert chroma[:8] == (9, 9, 12, 24, 50, 50, 50, 50)
    assert photo.CIFAKE_JPEG_SUBSAMPLING == 2  # Pillow's code for 4:2:0


def test_shrink_jpeg_step_changes_pixels_and_is_near_idempotent():
    out = shrink(_photo(), "bilinear", CIFAKE_JPEG_QUALITY)
    # the re-encode changed the pixels, and JPEG at the same settings is near idempotent
    plain = shrink(_photo(), "bilinear")
    assert not np.array_equal(out, plain)
    again = photo.jpeg_roundtrip(out, CIFAKE_JPEG_QUALITY)
    assert np.abs(again.astype(int) - out).mean() < np.abs(out.astype(int) - plain).mean()


def test_shrink_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown resize filter 'gauss'"):
        shrink(_photo(), "gauss")
    with pytest.raises(ValueError, match="quality must be in 1..100, got 0"):
        photo.jpeg_roundtrip(np.zeros((32, 32, 3), np.uint8), 0)


# ------------------------------------------------------------------ out of distribution
def test_ood_32x32_colour_is_in_distribution():
    assert is_out_of_distribution((32, 32)) == (False, "")
    assert is_out_of_distribution((32, 32), "RGB") == (False, "")


@pytest.mark.parametrize("size,words", [((640, 480), ["shrunk from 640x480", "centre square"]),
                                        ((512, 512), ["shrunk from 512x512"]),
                                        ((16, 16), ["enlarged from 16x16"]),
                                        ((32, 64), ["shrunk from 32x64", "centre square"])])
def test_ood_resized_inputs_are_flagged_with_a_reason(size, words):
    ood, why = is_out_of_distribution(size)
    assert ood and "\n" not in why and "32x32" in why
    for w in words:
        assert w in why
    if size[0] == size[1]:
        assert "centre square" not in why


def test_ood_grayscale_is_flagged_even_at_32x32():
    ood, why = is_out_of_distribution((32, 32), "L")
    assert ood and "grayscale" in why
    ood, why = is_out_of_distribution((100, 100), "L")
    assert "shrunk" in why and "grayscale" in why


def test_ood_rejects_empty_size():
    with pytest.raises(ValueError, match="0x5"):
        is_out_of_distribution((0, 5))


# ------------------------------------------------------------------ the statistic
def test_radial_spectrum_shape_and_normalisation():
    from bench.photo.study import radial_log_spectrum
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    s = radial_log_spectrum(imgs)
    assert s.shape == (5, 16) and np.isfinite(s).all()
    assert np.allclose((10 ** s).sum(axis=1), 1.0)
    flat = radial_log_spectrum(np.full((1, 32, 32, 3), 77, np.uint8))  # no division by zero
    assert np.isfinite(flat).all()


def test_spectrum_sees_blur_and_distance_is_zero_on_itself():
    from bench.photo.study import radial_log_spectrum, spectral_distance
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    blurred = np.stack([np.asarray(Image.fromarray(a).resize((8, 8), Image.Resampling.BOX)
                                   .resize((32, 32), Image.Resampling.BILINEAR)) for a in noise])
    sn, sb = radial_log_spectrum(noise), radial_log_spectrum(blurred)
    assert sb[:, -4:].mean() < sn[:, -4:].mean() - 1  # blur removes high frequencies
    assert spectral_distance(sn, sn.mean(axis=0)) == pytest.approx(0.0, abs=1e-12)
    assert spectral_distance(sb, sn.mean(axis=0)) > 0.5


def test_lattice_residual_tells_jpeg_from_never_quantised():
    from bench.photo.study import lattice_residual, pillow_tables
    luma_q = np.array(pillow_tables(CIFAKE_JPEG_QUALITY)[0])
    # texture at every frequency, so that the high-frequency coefficients are not all ~0
    raw = np.random.default_rng(3).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert lattice_residual(raw, luma_q) > 0.1
    assert lattice_residual(photo.jpeg_roundtrip(raw, CIFAKE_JPEG_QUALITY), luma_q) < 0.06


def test_implied_quality_recovers_pillow_quality():
    from bench.photo.study import implied_quality, pillow_tables
    assert implied_quality(pillow_tables(75)) == 75
    assert implied_quality(pillow_tables(90)) == 90
    assert implied_quality(((1,) * 64,)) is None


# ------------------------------------------------------------------ cifake.realworld
def test_realworld_end_to_end_on_a_generated_cnn_run(tmp_path, capsys):
    require_modules("skimage", extra="realworld")
    torch = require("torch")
    from cifake import realworld
    from torch_cnn import checkpoint
    from torch_cnn.model import build_model
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save(run / "model.safetensors", build_model("baseline"), "baseline")
    (run / "config.json").write_text(json.dumps({"run_format": RUN_FORMAT, "family": "cnn", "model": "baseline",
                                                 "stack": "torch_cnn", "epochs": 1}))
    out = tmp_path / "out"
    assert realworld.main(["--run", str(run), "--out", str(out)]) == 0
    res = json.loads((out / "realworld.json").read_text())
    assert realworld.read_result(out / "realworld.json") == res  # what it writes, it reads back
    assert res["n_photos"] == len(realworld.PHOTOS)
    assert len(res["rows"]) == 11 and sum(r["chosen"] for r in res["rows"]) == 1
    for r in res["rows"]:
        assert 0 <= r["n_fake"] <= r["n"] and len(r["p_fake"]) == r["n"]
        assert r["fpr"] == pytest.approx(sum(p >= 0.5 for p in r["p_fake"].values()) / r["n"])
    assert (out / "realworld.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "realworld.csv").read_text().count("\n") == 12
    assert "★" in (out / "realworld.md").read_text()


def test_realworld_bad_run_is_one_line(tmp_path):
    from cifake import realworld
    from data.errors import UserError
    with pytest.raises(UserError, match="not a directory"):
        realworld.main(["--run", str(tmp_path / "nope")])
    (tmp_path / "config.json").write_text(json.dumps({"family": "rnn"}))
    with pytest.raises(UserError, match="family 'rnn'"):
        realworld.main(["--run", str(tmp_path)])
