"""The robustness battery: each perturbation's definition (``data.perturb``), the ROC-AUC
it reports, and ``python -m cifake.battery`` end to end on generated runs of the NumPy
MLP, the torch CNN and the JAX port, on a tiny archive the tests write themselves."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from core.metrics import roc_auc
from core.rundir import RUN_FORMAT
from data import perturb as P
from data.errors import UserError
from tests.helpers import (assert_ok, assert_user_error, make_archive, mlp_run, require, run,
                           synthetic_image)

OUTPUTS = ("battery.csv", "battery.md", "battery.png", "battery.json")
KEYS = ["clean", "jpeg90", "jpeg75", "jpeg50", "jpeg30", "resize0.5-bilinear",
        "resize0.5-nearest", "resize0.75-bilinear", "resize0.75-nearest", "blur0.5", "blur1.0",
        "noise2", "noise5"]


def smooth_image() -> np.ndarray:
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([x * 6 + 20, y * 6 + 20, (x + y) * 3 + 30], -1).astype(np.uint8)


def noisy_batch(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


# ------------------------------------------------------------------ perturbations
def test_the_battery_is_the_documented_13_conditions():
    assert [p.key for p in P.BATTERY] == KEYS
    assert P.BATTERY[0].kind == "clean"


def test_jpeg_q100_is_close_to_identity_and_lower_qualities_change_more():
    img = smooth_image()
    before = img.copy()
    err = {q: np.abs(P.jpeg(img, q).astype(int) - img).mean() for q in (100, 90, 75, 50, 30)}
    assert np.array_equal(img, before)  # the input is not modified
    assert err[100] < 1.0 and np.abs(P.jpeg(img, 100).astype(int) - img).max() <= 8
    assert err[100] < err[90] < err[75] < err[50] < err[30]
    assert not np.array_equal(P.jpeg(img, 30), img)
    batch = noisy_batch(3)
    out = P.jpeg(batch, 75)
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert np.array_equal(out[1], P.jpeg(batch[1], 75))  # a batch is its images one by one
    assert np.array_equal(out, P.jpeg(batch, 75))        # deterministic
    with pytest.raises(ValueError):
        P.jpeg(img, 0)


def test_resize_nearest_by_half_keeps_an_image_of_2x2_blocks():
    blocks = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    img = blocks.repeat(2, axis=1).repeat(2, axis=2)  # every 2x2 block one colour
    assert np.array_equal(P.resize(img, 0.5, "nearest"), img)
    assert not np.array_equal(P.resize(img, 0.5, "bilinear"), img)
    assert not np.array_equal(P.resize(img, 0.75, "nearest"), img)
    flat = np.full((32, 32, 3), 77, np.uint8)  # a constant image survives every filter
    for scale in (0.5, 0.75):
        for f in ("bilinear", "nearest"):
            assert np.array_equal(P.resize(flat, scale, f), flat)
    assert np.array_equal(P.resize(img, 1.0, "bilinear"), img)
    with pytest.raises(ValueError):
        P.resize(img, 0.5, "hamming-ish")
    with pytest.raises(ValueError):
        P.resize(img, 1.5, "nearest")


def test_blur_is_the_documented_gaussian():
    k = P.gaussian_kernel(1.0)
    assert len(k) == 9 and abs(k.sum() - 1) < 1e-15 and k[4] == k.max()
    assert len(P.gaussian_kernel(0.5)) == 5
    img = noisy_batch(2)
    assert np.array_equal(P.blur(img, 0), img)
    flat = np.full((32, 32, 3), 200, np.uint8)
    assert np.array_equal(P.blur(flat, 1.0), flat)
    # an impulse far from the edges spreads as the outer product of the kernel, rounded
    impulse = np.zeros((32, 32, 3), np.uint8)
    impulse[16, 16] = 255
    out = P.blur(impulse, 1.0)
    expect = np.rint(255 * np.outer(k, k))
    assert np.array_equal(out[12:21, 12:21, 0], expect)
    assert out[:12].max() == 0 and np.array_equal(out[..., 0], out[..., 2])
    assert P.blur(img, 1.0).std() < P.blur(img, 0.5).std() < img.std()


def test_blur_matches_scipy_gaussian_filter():
    ndimage = require("scipy.ndimage")
    img = noisy_batch(4, seed=3)
    for sigma in (0.5, 1.0):
        ref = [np.clip(np.rint(ndimage.gaussian_filter(
            im.astype(np.float64), sigma, mode="reflect", truncate=4.0, axes=(0, 1))), 0, 255)
            for im in img]
        assert np.array_equal(P.blur(img, sigma), np.stack(ref).astype(np.uint8))


def test_noise_is_seeded_per_image_and_sigma_0_is_identity():
    img = np.full((5, 32, 32, 3), 128, np.uint8)
    idx = np.array([0, 7, 3, 11, 2])
    assert np.array_equal(P.noise(img, 0, idx), img)
    a = P.noise(img, 5, idx)
    assert np.array_equal(a, P.noise(img, 5, idx))           # reproducible
    assert np.array_equal(a[1], P.noise(img[1], 5, 7))       # independent of the batch
    assert np.array_equal(a[2:4], P.noise(img[2:4], 5, idx[2:4]))
    assert not np.array_equal(a[0], a[4])                     # each index its own noise
    assert not np.array_equal(a, P.noise(img, 5, idx, seed=1))
    d = a.astype(np.float64) - 128
    assert abs(d.mean()) < 0.2 and 4.7 < d.std() < 5.3
    # the same z scaled: sigma 2 is sigma 5's field, times 0.4, before rounding
    z = P.noise_field(idx, (32, 32, 3))
    assert np.array_equal(P.noise(img, 2, idx), np.clip(np.rint(128 + 2 * z), 0, 255))
    edge = np.zeros((1, 32, 32, 3), np.uint8)
    assert P.noise(edge, 50, [0]).min() == 0  # clipped, not wrapped
    with pytest.raises(ValueError):
        P.noise(img, 5, idx[:3])


def test_apply_clean_is_the_input_itself():
    img = noisy_batch(2)
    assert P.apply(P.BATTERY[0], img, [0, 1]) is img
    for p in P.BATTERY:
        out = P.apply(p, img, [0, 1])
        assert out.shape == img.shape and out.dtype == np.uint8


# ------------------------------------------------------------------ metrics
def test_roc_auc_on_a_hand_computed_case_with_ties():
    # positives 0.5, 0.9; negatives 0.2, 0.5: 0.5>0.2, 0.5=0.5 (half), 0.9>0.2, 0.9>0.5
    assert roc_auc(np.array([0.2, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == 3.5 / 4
    assert roc_auc(np.full(6, 0.3), np.array([0, 1] * 3)) == 0.5
    assert roc_auc(np.array([0.1, 0.2, 0.3]), np.array([1, 0, 0])) == 0.0
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_roc_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 8, 300).astype(np.float64)  # many ties
        y = rng.integers(0, 2, 300)
        pos, neg = s[y == 1], s[y == 0]
        pairs = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
        assert abs(roc_auc(s, y) - pairs / (len(pos) * len(neg))) < 1e-12


def test_rows_report_accuracy_auc_and_the_drop_from_clean():
    from cifake.battery import condition_rows
    labels = np.array([0, 0, 1, 1])  # FAKE, FAKE, REAL, REAL
    conds = (P.Perturbation("clean", "clean", "clean"), P.Perturbation("x", "x", "blur", 1.0))
    rows = condition_rows({"clean": np.array([0.9, 0.6, 0.2, 0.4]),
                           "x": np.array([0.9, 0.3, 0.2, 0.6])}, labels, conds)
    assert rows[0]["accuracy"] == 100 and rows[0]["roc_auc"] == 1.0
    assert rows[1]["accuracy"] == 50 and rows[1]["acc_drop_pp"] == 50
    assert rows[1]["fake_right"] == 50 and rows[1]["real_right"] == 50
    assert rows[1]["roc_auc"] == 0.75 and rows[1]["auc_drop"] == 0.25


def test_stratified_first_keeps_the_class_shares_and_the_order():
    from cifake.battery import stratified_first
    labels = np.array([0, 1] * 10)
    idx = stratified_first(labels, 7)
    assert list(idx) == sorted(idx) and np.bincount(labels[idx]).tolist() == [4, 3]
    assert list(stratified_first(labels, 4)) == [0, 1, 2, 3]
    skewed = np.array([0] * 15 + [1] * 5)
    assert np.bincount(skewed[stratified_first(skewed, 8)]).tolist() == [6, 2]
    assert len(stratified_first(labels, 100)) == 20


def test_results_do_not_depend_on_the_batch_size_or_worker_processes():
    from cifake.battery import perturbed
    img = noisy_batch(10, seed=5)
    idx = np.arange(100, 110)

    def collect(batch_size, workers):
        got = {p.key: np.empty_like(img) for p in P.BATTERY}
        for lo, p, x, _ in perturbed(img, idx, batch_size, P.BATTERY, workers=workers):
            got[p.key][lo:lo + len(x)] = x
        return got
    one, other = collect(10, 1), collect(3, 2)
    for k in KEYS:
        assert np.array_equal(one[k], other[k]), k


# ------------------------------------------------------------------ the command
@pytest.fixture
def archive(tmp_path):
    """6 test images per class (and 2 train)."""
    return make_archive(tmp_path / "tiny.zip", n_train=2, n_test=6)


def cnn_run(d: Path) -> Path:
    torch = require("torch")
    from torch_cnn import checkpoint
    from torch_cnn.model import build_model
    torch.manual_seed(0)
    d.mkdir(parents=True)
    checkpoint.save(d / "model.safetensors", build_model("baseline"), "baseline")
    (d / "config.json").write_text(json.dumps({"run_format": RUN_FORMAT, "model": "baseline",
                                               "family": "cnn", "stack": "torch_cnn"}))
    return d


def realworld_json(run: Path) -> None:
    """What ``cifake.realworld --out RUN`` leaves, reduced to what the battery reads."""
    (run / "realworld.json").write_text(json.dumps({
        "pipeline": "centre square crop, Pillow bilinear to 32x32, JPEG quality 75 4:2:0",
        "rows": [{"key": "box", "chosen": False, "n": 16, "n_fake": 9},
                 {"key": "bilinear+jpeg75", "chosen": True, "n": 16, "n_fake": 1}]}))


def battery_argv(run, archive, tmp_path, *extra) -> list[str]:
    return ["--run", str(run), "--data", str(archive), "--cache-dir", str(tmp_path / "cache"),
            *map(str, extra)]


def no_outputs(folder: Path) -> bool:
    return not any(folder.glob("battery*")) and not any(folder.glob(".battery*"))


def test_numpy_mlp_end_to_end(archive, tmp_path):
    from numpy_mlp.predict import Detector
    from data import load_cifake
    run_dir = mlp_run(tmp_path / "run")
    realworld_json(run_dir)
    p = run("cifake.battery", *battery_argv(run_dir, archive, tmp_path, "--batch-size", 5))
    assert_ok(p)
    assert all((run_dir / f).is_file() for f in OUTPUTS)
    res = json.loads((run_dir / "battery.json").read_text())
    assert [r["key"] for r in res["rows"]] == KEYS
    assert res["data"]["n"] == 12 and res["data"]["limit"] is None
    assert res["data"]["n_fake"] == res["data"]["n_real"] == 6
    assert res["realworld"]["n_fake"] == 1 and res["realworld"]["n"] == 16
    assert res["scored_with"] == "numpy_mlp" and res["timing"]["predictions"] == 12 * 13
    # the clean row is what the product's own predict says about the same images
    ds = load_cifake(archive, tmp_path / "cache", verbose=False)
    recs = Detector.load(run_dir).predict(ds.test.images)
    right = [(r["label"] == "FAKE") == (y == 0) for r, y in zip(recs, ds.test.labels)]
    assert abs(res["rows"][0]["accuracy"] - 100 * np.mean(right)) < 1e-9
    assert res["rows"][0]["acc_drop_pp"] == 0
    rows = list(csv.DictReader((run_dir / "battery.csv").open()))
    assert [r["condition"] for r in rows] == KEYS and rows[0]["realworld_fpr"] == "0.0625"
    md = (run_dir / "battery.md").read_text()
    assert "| JPEG quality 30 |" in md and "1 / 16 genuine photographs" in md
    assert (run_dir / "battery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in p.stdout and "| clean (as stored) |" in p.stdout


def test_torch_cnn_with_limit_and_out(archive, tmp_path, capsys):
    from cifake import battery
    run_dir = cnn_run(tmp_path / "cnn")
    out = tmp_path / "results" / "battery"
    assert battery.main(battery_argv(run_dir, archive, tmp_path, "--limit", 5, "--out", out,
                                     "--device", "cpu")) == 0
    assert no_outputs(run_dir) and all((out / f).is_file() for f in OUTPUTS)
    res = json.loads((out / "battery.json").read_text())
    assert res["data"]["limit"] == 5 and res["data"]["n"] == 5 and res["data"]["n_split"] == 12
    assert (res["data"]["n_fake"], res["data"]["n_real"]) == (3, 2)
    assert res["scored_with"] == "torch_cnn" and res["realworld"] is None
    assert all(r["n"] == 5 for r in res["rows"])
    assert "the first 5 of 12 (--limit 5, stratified)" in (out / "battery.md").read_text()
    assert "not measured" in capsys.readouterr().out


def test_jax_port_scores_the_mlp_run_like_numpy(archive, tmp_path):
    require("jax")
    from cifake import battery
    run_dir = mlp_run(tmp_path / "run")
    means = {}
    for stack in ("numpy", "jax"):
        out = tmp_path / stack
        assert battery.main(battery_argv(run_dir, archive, tmp_path, "--stack", stack,
                                         "--out", out, "--device", "cpu")) == 0
        res = json.loads((out / "battery.json").read_text())
        means[stack] = [r["mean_p_fake"] for r in res["rows"]]
    assert res["scored_with"] == "jax_port"
    assert np.allclose(means["numpy"], means["jax"], atol=1e-5)


@pytest.mark.parametrize("extra, needle", [
    (("--limit", "0"), "--limit"),
    (("--batch-size", "x"), "--batch-size"),
    (("--workers", "-1"), "--workers"),
    (("--data", "/nonexistent/cifake.zip"), "cifake.zip"),
    (("--stack", "tensorflow"), "--stack"),
])
def test_bad_flags_are_refused_and_nothing_is_written(extra, needle, archive, tmp_path):
    from cifake import battery
    run_dir = mlp_run(tmp_path / "run")
    argv = battery_argv(run_dir, archive, tmp_path)
    if extra[0] == "--data":
        argv = argv[:2] + argv[4:]
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        battery.main(argv + list(extra))
    assert no_outputs(run_dir)


def test_bad_runs_are_one_line_errors(archive, tmp_path):
    missing = tmp_path / "nope"
    assert_user_error(run("cifake.battery", *battery_argv(missing, archive, tmp_path)), "nope")
    assert not missing.exists()
    diverged = mlp_run(tmp_path / "nan", nan=True)
    assert_user_error(run("cifake.battery", *battery_argv(diverged, archive, tmp_path)),
                      "model.safetensors", "non-finite")
    assert no_outputs(diverged)
    broken = mlp_run(tmp_path / "broken")
    (broken / "realworld.json").write_text("{not json")
    assert_user_error(run("cifake.battery", *battery_argv(broken, archive, tmp_path)),
                      "realworld.json")
    assert no_outputs(broken)


def test_a_failure_after_scoring_writes_nothing(archive, tmp_path, monkeypatch):
    from cifake import battery

    def broken_chart(result):
        raise UserError("chart failed")
    monkeypatch.setattr(battery, "figure_png", broken_chart)
    run_dir = mlp_run(tmp_path / "run")
    with pytest.raises(UserError, match="chart failed"):
        battery.main(battery_argv(run_dir, archive, tmp_path))
    assert no_outputs(run_dir)


def test_split_val_scores_the_images_the_run_held_out(tmp_path):
    """A NumPy MLP trained with --val 16: the battery on its validation split scores those
    16 images (its clean accuracy is the run's own final validation accuracy), writes
    battery-val.* beside nothing else; a run without --val, or data whose draw differs from
    the run's val_digest, is a one-line refusal."""
    from cifake import battery
    zip_path = make_archive(tmp_path / "small.zip", n_train=20, n_test=4)
    run_dir = tmp_path / "run"
    assert_ok(run("numpy_mlp.train", "--preset", "mlp2-mini", "--epochs", "2", "--val", "16",
                  "--data", zip_path, "--cache-dir", tmp_path / "cache", "--out", run_dir,
                  "--no-progress"))
    argv = battery_argv(run_dir, zip_path, tmp_path, "--split", "val")
    assert battery.main(argv) == 0
    names = ("battery-val.md", "battery-val.csv", "battery-val.png", "battery-val.json")
    assert all((run_dir / f).is_file() for f in names) and not (run_dir / "battery.json").exists()
    res = json.loads((run_dir / "battery-val.json").read_text())
    assert res["data"]["split"] == "val" and res["data"]["n"] == res["data"]["n_split"] == 16
    assert res["data"]["n_fake"] == res["data"]["n_real"] == 8
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert abs(res["rows"][0]["accuracy"] - final["val_acc"]) < 1e-9
    assert "validation images (held out of CIFAKE's training split: --val 16" in \
        (run_dir / "battery-val.md").read_text()
    # the test split's battery is another file, not overwritten
    assert battery.main(battery_argv(run_dir, zip_path, tmp_path)) == 0
    assert json.loads((run_dir / "battery.json").read_text())["data"]["split"] == "test"
    assert json.loads((run_dir / "battery-val.json").read_text()) == res
    # refusals: no validation split; another draw than the run recorded
    plain = mlp_run(tmp_path / "plain")
    with pytest.raises(UserError, match=r"held out no validation images.*--val N"):
        battery.main(battery_argv(plain, zip_path, tmp_path, "--split", "val"))
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**cfg, "val_seed": 1}))
    with pytest.raises(UserError, match="not the validation images the run held out"):
        battery.main(argv + ["--out", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def test_battery_html_for_the_web_page(archive, tmp_path):
    from cifake import battery
    run_dir = mlp_run(tmp_path / "run<b>")
    before = battery.battery_html(run_dir)
    assert "not been measured" in before and "run&lt;b&gt;" in before and "<b>" in before
    assert battery.main(battery_argv(run_dir, archive, tmp_path, "--limit", 4)) == 0
    page = battery.battery_html(run_dir)
    assert page == battery.battery_html(run_dir / "battery.json")
    assert page.count("<tr>") == 14 and "JPEG quality 50" in page
    assert "data:image/png;base64," in page and "--limit 4" in page
    (run_dir / "battery.json").write_text(json.dumps({"rows": [{"label": "x"}]}))
    with pytest.raises(UserError, match="not a cifake.battery result"):
        battery.battery_html(run_dir)
