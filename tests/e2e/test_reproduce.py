"""bench.studies.reproduce end to end: a clearly labelled miniature of the seven-row table."""
import csv
import json
import subprocess
import sys

import pytest

from core.catalog import ROWS
from tests.helpers import REPO


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "bench.studies.reproduce", *args], cwd=REPO,
                          capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_miniature_table_on_mini_archive(mini_zip, tmp_path):
    out = tmp_path / "rep"
    args = ["--data", str(mini_zip), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            "--epochs-scale", "0.0003", "--subset", "16"]
    r = _run(args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r_["row"] for r_ in rows] == list(ROWS)
    for r_ in rows:
        assert r_["status"] == "done"
        assert 0 <= float(r_["test_acc"]) <= 100 and 0 <= float(r_["train_acc"]) <= 100
        assert float(r_["gap_pp"]) == pytest.approx(float(r_["train_acc"]) - float(r_["test_acc"]),
                                                    abs=1e-6)
        assert r_["epochs"] == "1" or r_["row"].endswith("-full")
    md = (out / "table.md").read_text()
    assert "MINIATURE" in md and md.count("\n| ") == len(ROWS) + 1
    for name in ["bars.png"] + [f"curves_{row}.png" for row in ROWS]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    meta = json.loads((out / "reproduce.json").read_text())
    assert meta["miniature"] is True and len(meta["rows"]) == len(ROWS)

    # resumable: a second invocation runs nothing again
    r2 = _run(args, timeout=120)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "done in" not in r2.stderr and "--preset" not in r2.stderr


def test_reproduce_refuses_bad_rows(tmp_path):
    r = _run(["--rows", "mlp9", "--out", str(tmp_path / "x")], timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "mlp9" in r.stderr
    assert "Traceback" not in r.stderr


def test_reproduce_refuses_a_run_made_with_other_settings(tmp_path):
    """A finished run of an older preset must not be shown (or resumed) as the current row."""
    from core.catalog import PRESETS
    run = tmp_path / "rep" / "runs" / "numpy_mlp-mlp2-mini"
    run.mkdir(parents=True)
    cfg = dict(PRESETS["mlp2-mini"], preset="mlp2-mini", subset=None)  # only lr differs below
    cfg["lr"] = cfg["lr"] * 2
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.json").write_text(json.dumps({"complete": True, "history": [], "final": {}}))
    for extra in ([], ["--plots-only"]):  # neither rerun/resumed nor tabulated as the row
        r = _run(["--rows", "mlp2-mini", "--out", str(tmp_path / "rep"), *extra], timeout=60)
        assert r.returncode == 2, r.stderr
        assert str(run) in r.stderr and "lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "rep" / "table.md").exists()
    # the same directory with the current settings is accepted (complete: nothing to run)
    cfg["lr"] = PRESETS["mlp2-mini"]["lr"]
    (run / "config.json").write_text(json.dumps(cfg))
    r = _run(["--rows", "mlp2-mini", "--out", str(tmp_path / "rep"), "--plots-only"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(["--rows", "mlp2-mini", "--out", str(tmp_path / "rep")], timeout=120)
    assert r.returncode == 0 and "--preset" not in r.stderr, r.stderr[-2000:]


def test_seeds_run_into_their_own_directories_and_are_checked(mini_zip, tmp_path):
    out = tmp_path / "rep"
    args = ["--rows", "mlp2-mini", "--seeds", "0,1", "--data", str(mini_zip), "--cache-dir",
            str(tmp_path / "cache"), "--out", str(out), "--epochs-scale", "0.01", "--subset", "16"]
    r = _run(args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, seed in (("numpy_mlp-mlp2-mini", 0), ("numpy_mlp-mlp2-mini-s1", 1)):
        assert json.loads((out / "runs" / name / "config.json").read_text())["seed"] == seed
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r_["row"], r_["seed"], r_["status"]) for r_ in rows] == [
        ("mlp2-mini", "0", "done"), ("mlp2-mini", "1", "done")]
    assert (out / "curves_mlp2-mini-s1.png").exists()
    # a seed-1 folder holding another seed's run is refused, not shown as seed 1
    cfg = out / "runs" / "numpy_mlp-mlp2-mini-s1" / "config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), seed=0)))
    r = _run(args + ["--plots-only"], timeout=120)
    assert r.returncode == 2 and "seed 0 (now 1)" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("seeds", ["0,0", "1,x", "-1"])
def test_bad_seed_lists_are_refused(seeds, tmp_path):
    r = _run(["--seeds", seeds, "--out", str(tmp_path / "x")], timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_each_backend_writes_where_side_by_side_reads():
    from bench.studies import reproduce
    from bench.studies import side_by_side
    sbs = vars(side_by_side.parse_args([]))
    assert reproduce.default_out("jax") == sbs["jax"]
    assert {reproduce.default_out(b) for b in ("spec", "numpy", "torch")} == {sbs["spec"]}
