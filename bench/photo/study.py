"""``python -m bench.photo.study --data cifake.zip [--out results/photo-study]``: how CIFAKE's
images were made, and which way of shrinking a photo makes it look most like them.

1. JPEG survey of ``--per-class`` files per class (train and test alike): quantisation
   tables, the IJG quality they equal (matched against Pillow's tables at every quality),
   chroma subsampling, progressive or baseline, and whether the Huffman tables are the
   standard ones (an encoder fingerprint).
2. The statistic: the radially averaged log power spectrum of the luma, normalised to
   unit total power (so it measures the *shape* of the spectrum, how energy falls with
   frequency, not contrast or brightness). ``spectral_distance`` is the RMS difference,
   in decades, over radial frequencies 1..16 cycles per image, between the mean spectrum
   of a set of shrunk photos and the mean over CIFAKE's images of BOTH classes pooled.
   It never looks at a model: the pipeline it picks cannot have been tuned to make the
   detector say REAL, which would also make real fakes pass.
3. A second, JPEG-specific check: how closely the 8x8-block DCT coefficients of the luma
   sit on the lattice of CIFAKE's quantisation steps (0 for a JPEG decoded from those
   tables, up to rounding; about 0.25 for an image that was never quantised).
4. Every candidate pipeline of ``cifake.realworld`` scored by both, on the same photos,
   plus the sampling noise of the statistic itself (random sets of as many CIFAKE images
   as there are photos).

Writes ``--out``/photo_study.{json,md} and spectra.png (aggregate statistics only).
"""
from __future__ import annotations

import io
from collections import Counter
from datetime import datetime, timezone

import numpy as np
from PIL import Image, JpegImagePlugin

from data.errors import run_cli
from data.photo import CIFAKE_JPEG_QUALITY, FILTERS, PIPELINE, SIZE, shrink
from core import flags
from core.atomic import atomic_write_bytes, atomic_write_json
from core.flags import ArgumentParser, positive_int

from ..files import out_dir, png_bytes

PROG = "python -m bench.photo.study"
R_MAX = SIZE // 2  # radial frequencies 1..16 cycles per image: the ring the Nyquist limit bounds


# ------------------------------------------------------------------ the statistic
def luma(rgb: np.ndarray) -> np.ndarray:
    """JPEG's (BT.601) luma of uint8 RGB (..., H, W, 3) -> float64 (..., H, W)."""
    x = np.asarray(rgb, np.float64)
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _radius(n: int) -> np.ndarray:
    f = np.fft.fftfreq(n) * n
    return np.rint(np.hypot(f[:, None], f[None, :])).astype(int)


def radial_log_spectrum(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (N, 32, 32, 3) -> (N, 16): log10 of the luma's power in each integer
    radial frequency 1..16, as a fraction of the image's total (non-DC) power.

    The mean is removed and a Hann window applied first, so the jump between opposite
    edges (which the FFT treats as neighbours) does not add a cross of spurious power.
    A flat image (no power at all) gets a flat spectrum rather than a division by zero.
    """
    y = luma(rgb)
    if y.ndim == 2:
        y = y[None]
    n = y.shape[-1]
    if y.shape[-2:] != (n, n):
        raise ValueError(f"expected square images, got {y.shape[-2:]}")
    w = np.hanning(n + 2)[1:-1]  # no zero weights at the border: every pixel counts
    y = (y - y.mean(axis=(-2, -1), keepdims=True)) * np.outer(w, w)
    p = np.abs(np.fft.fft2(y)) ** 2
    r = _radius(n)
    rings = np.stack([p[:, r == k].mean(axis=1) for k in range(1, n // 2 + 1)], axis=1)
    total = rings.sum(axis=1, keepdims=True)
    rings = np.where(total > 0, rings / np.where(total > 0, total, 1), 1.0 / rings.shape[1])
    return np.log10(np.maximum(rings, 1e-12))


def spectral_distance(spectra: np.ndarray, reference: np.ndarray) -> float:
    """RMS over radial frequency of (mean of ``spectra`` - ``reference``), in decades."""
    d = np.asarray(spectra).mean(axis=0) - np.asarray(reference)
    return float(np.sqrt(np.mean(d ** 2)))


_C = np.array([[np.sqrt((1 if u == 0 else 2) / 8) * np.cos((2 * x + 1) * u * np.pi / 16)
                for x in range(8)] for u in range(8)])  # orthonormal 8-point DCT-II = JPEG's


def block_dct(y: np.ndarray) -> np.ndarray:
    """Luma (N, H, W), H and W multiples of 8 -> (N, H/8, W/8, 8, 8) JPEG DCT coefficients
    of the level-shifted (-128) blocks."""
    n, h, w = y.shape
    b = (y - 128.0).reshape(n, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4)
    return _C @ b @ _C.T


def lattice_residual(rgb: np.ndarray, qtable: np.ndarray, min_step: int = 10) -> float:
    """Mean |c/q - round(c/q)| over the luma's AC DCT coefficients whose step q (CIFAKE's
    luma table, natural order 8x8) is at least ``min_step`` (smaller steps drown in the
    pixel rounding). ~0 when the image was JPEG-compressed with this table, ~0.25 when it
    was never quantised."""
    c = block_dct(luma(np.asarray(rgb).reshape(-1, SIZE, SIZE, 3)))
    q = np.asarray(qtable, np.float64).reshape(8, 8)
    mask = q >= min_step
    mask[0, 0] = False
    z = c[..., mask] / q[mask]
    return float(np.mean(np.abs(z - np.rint(z))))


# ------------------------------------------------------------------ the JPEG survey
def _dht_segments(data: bytes) -> bytes:
    """The concatenated DHT (Huffman table) segments of a JPEG, up to the first SOS."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xC4:
            out.append(data[i + 4:i + 2 + length])
        if marker == 0xDA:
            break
        i += 2 + length
    return b"".join(out)


def pillow_tables(quality: int) -> tuple[tuple[int, ...], ...]:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        q = im.quantization
    return tuple(tuple(q[k]) for k in sorted(q))


def implied_quality(tables) -> int | None:
    """The IJG quality whose scaled standard tables equal ``tables`` exactly, else None."""
    for quality in range(1, 101):
        if pillow_tables(quality) == tables:
            return quality
    return None


def jpeg_survey(src, entries, per_class: int, seed: int) -> dict:
    """Quantisation tables, implied quality, subsampling, progressive, Huffman tables of
    ``per_class`` random files per class."""
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (90, 120, 200)).save(buf, "JPEG", quality=CIFAKE_JPEG_QUALITY)
    standard_dht = _dht_segments(buf.getvalue())
    rng = np.random.default_rng(seed)
    out = {}
    for cls in ("REAL", "FAKE"):
        keys = [e.key for e in entries if e.cls == cls]
        pick = [keys[i] for i in rng.choice(len(keys), min(per_class, len(keys)), replace=False)]
        tables, sampling, progressive, dht, sizes, modes = (Counter() for _ in range(6))
        for k in pick:
            data = src.read(k)
            with Image.open(io.BytesIO(data)) as im:
                q = im.quantization
                tables[tuple(tuple(q[t]) for t in sorted(q))] += 1
                sampling[{0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(
                    JpegImagePlugin.get_sampling(im), "other")] += 1
                progressive[bool(im.info.get("progressive"))] += 1
                sizes[im.size] += 1
                modes[im.mode] += 1
            dht["standard" if _dht_segments(data) == standard_dht else "other"] += 1
        (top, n_top), = tables.most_common(1)
        out[cls] = {"files": len(pick), "distinct_quantisation_tables": len(tables),
                    "files_with_most_common_tables": n_top,
                    "luma_table": list(top[0]), "chroma_table": list(top[1]) if len(top) > 1 else None,
                    "implied_quality": implied_quality(top),
                    "subsampling": dict(sampling), "progressive": progressive[True],
                    "huffman_tables": dict(dht),
                    "sizes": {f"{w}x{h}": c for (w, h), c in sizes.items()},
                    "modes": dict(modes)}
    return out


# ------------------------------------------------------------------ the study
def candidates() -> list[tuple[str, str, int | None]]:
    out = []
    for f in FILTERS:
        out.append((f, f, None))
        out.append((f"{f}+jpeg{CIFAKE_JPEG_QUALITY}", f, CIFAKE_JPEG_QUALITY))
    return out


def study(ds, src, entries, per_class: int, seed: int, photos) -> dict:
    survey = jpeg_survey(src, entries, per_class, seed)
    luma_q = np.array(survey["REAL"]["luma_table"])
    rng = np.random.default_rng(seed + 1)
    split = ds.train
    spectra, lattice = {}, {}
    for label, cls in enumerate(("FAKE", "REAL")):
        idx = np.flatnonzero(split.labels == label)
        pick = rng.choice(idx, min(per_class, idx.size), replace=False)
        spectra[cls] = radial_log_spectrum(split.images[pick])
        lattice[cls] = lattice_residual(split.images[pick], luma_q)
    pooled = np.concatenate([spectra["REAL"], spectra["FAKE"]])
    ref = pooled.mean(axis=0)
    n_ph = len(photos)
    # The statistic's own noise: sets of n_ph CIFAKE images drawn from the pool.
    noise = np.array([spectral_distance(pooled[rng.choice(len(pooled), n_ph, replace=False)], ref)
                      for _ in range(500)])
    rows = []
    per_pipeline, per_photo = {}, {}
    for key, f, jq in candidates():
        batch = np.stack([shrink(im, f, jq) for im in photos])
        s = radial_log_spectrum(batch)
        per_pipeline[key] = s.mean(axis=0)
        per_photo[key] = s
        rows.append({"key": key, "filter": f, "jpeg_quality": jq,
                     "distance_pooled": spectral_distance(s, ref),
                     "distance_real": spectral_distance(s, spectra["REAL"].mean(axis=0)),
                     "distance_fake": spectral_distance(s, spectra["FAKE"].mean(axis=0)),
                     "high_freq_offset": float((s.mean(axis=0) - ref)[R_MAX // 2:].mean()),
                     "lattice_residual": lattice_residual(batch, luma_q)})
    best = min(rows, key=lambda r: r["distance_pooled"])
    # How much the choice rests on these particular photos: resample them with replacement
    # and count how often each pipeline is the minimiser.
    keys = [r["key"] for r in rows]
    wins = Counter()
    for _ in range(1000):
        i = rng.integers(0, n_ph, n_ph)
        wins[min(keys, key=lambda k: spectral_distance(per_photo[k][i], ref))] += 1
    for r in rows:
        r["bootstrap_wins"] = wins[r["key"]] / 1000
    # Exploratory, not a candidate: would blurring the chosen filter's output further bring
    # the photos closer? (A blur fitted to these photos would be fitted to their content.)
    blur = []
    for sigma in (0.3, 0.5, 0.7, 1.0):
        batch = np.stack([_blurred(im, best["filter"], sigma, best["jpeg_quality"])
                          for im in photos])
        blur.append({"sigma": sigma,
                     "distance_pooled": spectral_distance(radial_log_spectrum(batch), ref)})
    return {"survey": survey,
            "cifake_spectra": {"REAL": spectra["REAL"].mean(axis=0).tolist(),
                               "FAKE": spectra["FAKE"].mean(axis=0).tolist(),
                               "pooled": ref.tolist(), "images_per_class": per_class},
            "cifake_real_vs_fake_distance": spectral_distance(spectra["REAL"],
                                                              spectra["FAKE"].mean(axis=0)),
            "cifake_lattice_residual": lattice,
            "noise": {"sets_of": n_ph, "median": float(np.median(noise)),
                      "p95": float(np.percentile(noise, 95))},
            "pipelines": rows, "pipeline_spectra": {k: v.tolist() for k, v in per_pipeline.items()},
            "minimiser": best["key"], "exploratory_blur": blur}


def _blurred(im, filter: str, sigma: float, jpeg_quality: int | None) -> np.ndarray:
    from PIL import ImageFilter

    from data.photo import jpeg_roundtrip
    small = Image.fromarray(shrink(im, filter, None)).filter(ImageFilter.GaussianBlur(sigma))
    arr = np.asarray(small, np.uint8)
    return jpeg_roundtrip(arr, jpeg_quality) if jpeg_quality else arr


def study_md(res: dict) -> str:
    s = res["survey"]
    lines = ["## JPEG encoding of CIFAKE's files", "",
             "| | REAL | FAKE |", "|---|---|---|"]
    def both(f):
        return f"| {f[0]} | {f[1](s['REAL'])} | {f[1](s['FAKE'])} |"
    for f in (("files examined", lambda c: c["files"]),
              ("distinct quantisation-table sets", lambda c: c["distinct_quantisation_tables"]),
              ("IJG quality they equal", lambda c: c["implied_quality"]),
              ("chroma subsampling", lambda c: ", ".join(f"{k} ({v})" for k, v in c["subsampling"].items())),
              ("progressive files", lambda c: c["progressive"]),
              ("Huffman tables", lambda c: ", ".join(f"{k} ({v})" for k, v in c["huffman_tables"].items())),
              ("size, mode", lambda c: ", ".join(c["sizes"]) + ", " + ", ".join(c["modes"])),
              ("luma table, first row", lambda c: " ".join(map(str, c["luma_table"][:8]))),
              ("chroma table, first row", lambda c: " ".join(map(str, (c["chroma_table"] or [])[:8])))):
        lines.append(both(f))
    lat = res["cifake_lattice_residual"]
    lines += ["", "## The statistic: distance of luma log-spectra (decades, RMS over 1..16 "
              "cycles/image)", "",
              f"CIFAKE REAL mean vs FAKE mean: {res['cifake_real_vs_fake_distance']:.3f}. "
              f"Noise of the statistic (random sets of {res['noise']['sets_of']} CIFAKE images "
              f"vs the pooled mean): median {res['noise']['median']:.3f}, 95th percentile "
              f"{res['noise']['p95']:.3f}. JPEG-lattice residual of CIFAKE itself: REAL "
              f"{lat['REAL']:.3f}, FAKE {lat['FAKE']:.3f} (0.25 = never quantised).", "",
              "| pipeline (centre square crop first) | distance to pooled CIFAKE | to REAL | "
              "to FAKE | high-frequency offset (decades, 8..16) | JPEG-lattice residual | "
              "minimiser in photo bootstrap |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(res["pipelines"], key=lambda r: r["distance_pooled"]):
        star = " ★" if r["key"] == res["minimiser"] else ""
        lines.append(f"| {r['key']}{star} | {r['distance_pooled']:.3f} | {r['distance_real']:.3f}"
                     f" | {r['distance_fake']:.3f} | {r['high_freq_offset']:+.3f} | "
                     f"{r['lattice_residual']:.3f} | {100 * r['bootstrap_wins']:.0f}% |")
    lines += ["", "Exploratory (not a candidate): the minimiser's output blurred further with a "
              "Gaussian of sigma pixels before the JPEG step: "
              + ", ".join(f"sigma {b['sigma']}: {b['distance_pooled']:.3f}"
                          for b in res["exploratory_blur"]) + ".",
              "", f"Minimiser: **{res['minimiser']}**; data.photo.PIPELINE: {PIPELINE}."]
    return "\n".join(lines) + "\n"


def figure_png(res: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = np.arange(1, R_MAX + 1)
    cs = res["cifake_spectra"]
    ref = np.array(cs["pooled"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    for cls, col in (("REAL", "tab:blue"), ("FAKE", "tab:red")):
        a1.plot(r, cs[cls], color=col, lw=2.5, label=f"CIFAKE {cls}")
    a1.plot(r, ref, "k--", lw=2, label="CIFAKE pooled")
    for key, spec in res["pipeline_spectra"].items():
        if "+jpeg" in key:
            a1.plot(r, spec, lw=1, label=f"photos, {key}")
    a1.set_xlabel("radial frequency (cycles per 32 px)")
    a1.set_ylabel("log10 fraction of luma power")
    a1.set_title("Radially averaged luma spectrum")
    a1.legend(fontsize=7)
    for cls, col in (("REAL", "tab:blue"), ("FAKE", "tab:red")):
        a2.plot(r, np.array(cs[cls]) - ref, color=col, lw=2.5, label=f"CIFAKE {cls}")
    for key, spec in res["pipeline_spectra"].items():
        a2.plot(r, np.array(spec) - ref, lw=1, ls="-" if "+jpeg" in key else ":", label=key)
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xlabel("radial frequency (cycles per 32 px)")
    a2.set_ylabel("difference from pooled CIFAKE (decades)")
    a2.set_title("Difference from pooled CIFAKE (dotted: no JPEG)")
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return png_bytes(fig)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog=PROG, description="How CIFAKE's images were made, and which "
                        "shrink pipeline makes a photo look most like them.")
    ap.add_argument("--data", help="Kaggle cifake zip or folder (default: $CIFAKE_PATH)")
    ap.add_argument("--cache-dir")
    ap.add_argument("--per-class", type=positive_int("--per-class"), default=2000,
                    help="CIFAKE images per class for the statistics (default 2000)")
    ap.add_argument("--seed", type=flags.seed, default=0,
                    help="which CIFAKE images the statistics sample")
    ap.add_argument("--out", default="results/photo-study")
    args = ap.parse_args(argv)
    from data import load_cifake
    from data.source import open_source, resolve_path

    from data.realphotos import PHOTOS, load_photo
    path = resolve_path(args.data)
    ds = load_cifake(str(path), args.cache_dir, verbose=False)
    src = open_source(path)
    try:
        res = study(ds, src, src.entries(), args.per_class, args.seed,
                    [load_photo(p) for p in PHOTOS])
    finally:
        src.close()
    res["generated"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["photos"] = [p.path.rsplit("/", 1)[-1] for p in PHOTOS]
    out = out_dir(args.out)
    md = study_md(res)
    atomic_write_bytes(out / "photo_study.md", md.encode())
    atomic_write_json(out / "photo_study.json", res)
    atomic_write_bytes(out / "spectra.png", figure_png(res))
    print(md, end="")
    print(f"wrote {out}/photo_study.{{md,json}} and spectra.png")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
