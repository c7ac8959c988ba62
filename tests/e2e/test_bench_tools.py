"""bench.studies.seed_spread's statistics, bench.studies.frontier's table and bench.speed.gpu's
summary, on made-up inputs."""
from __future__ import annotations

import json
import math

import pytest

from bench.speed import gpu
from bench.studies import frontier, seed_spread
from core.catalog import PRESETS
from data.errors import UserError


def test_seed_spread_summary_is_mean_sample_std_and_standard_error():
    s = seed_spread.summarize([80.0, 82.0, 84.0, 86.0])
    assert s["mean"] == 83.0 and s["min"] == 80.0 and s["max"] == 86.0
    assert s["std"] == pytest.approx(math.sqrt(20 / 3))          # n - 1 in the denominator
    assert s["sem"] == pytest.approx(math.sqrt(20 / 3) / 2)
    one = seed_spread.summarize([81.5])
    assert one["std"] is None and one["sem"] is None  # one seed has no spread, not a zero one


def test_seed_spread_judges_a_difference_only_with_a_spread():
    a = seed_spread.summarize([80.0, 82.0, 84.0])
    b = seed_spread.summarize([84.0, 86.0, 88.0])
    v = seed_spread.compare(a, b)
    assert v["diff_pp"] == 4.0 and v["se_of_diff_pp"] == pytest.approx(math.sqrt(2 * 4 / 3))
    assert v["differ_by_more_than_2_se"] is True
    assert seed_spread.compare(a, seed_spread.summarize([82.1, 81.9, 82.0]))[
        "differ_by_more_than_2_se"] is False
    # one seed each: a zero standard error made any difference "significant"
    assert seed_spread.compare(seed_spread.summarize([80.0]), seed_spread.summarize([81.0])) is None


def _run(d, secs, accs, complete=True):
    d.mkdir(parents=True)
    hist = [{"epoch": i + 1, "seconds": s, "images_per_s": 1000 / s, "test_acc": a}
            for i, (s, a) in enumerate(zip(secs, accs))]
    (d / "config.json").write_text(json.dumps({"device": "gpu:0", "device_kind": "H"}))
    (d / "metrics.json").write_text(json.dumps({
        "history": hist, "complete": complete, "wall_seconds": 99.0,
        "final": {"train_acc": 97.0, "test_acc": accs[-1], "gap_pp": 97.0 - accs[-1],
                  "test_dedup": {"accuracy": 96.0}}}))
    return d


def test_gpu_training_summary_separates_the_first_epoch_and_the_compilation(tmp_path):
    r = gpu.training_summary(_run(tmp_path / "r", [7.0, 1.0, 2.0, 3.0], [90, 95, 96, 96.5]))
    assert r["train_seconds_sum"] == 13.0 and r["first_epoch_seconds"] == 7.0
    assert r["train_seconds_without_first"] == 6.0 and r["median_epoch_seconds"] == 2.0
    assert r["epochs_done"] == 4 and r["complete"] and r["test_acc"] == 96.5
    assert gpu.training_summary(tmp_path / "absent") == {}
    assert r["compile_seconds"] is None  # a run that recorded none
    m = tmp_path / "r" / "metrics.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "compile_seconds": 5.5}))
    assert gpu.training_summary(tmp_path / "r")["compile_seconds"] == 5.5


def test_gpu_refuses_unknown_or_all_skipped_steps(tmp_path):
    with pytest.raises(UserError, match="unknown step"):
        gpu.main(["--data", "x", "--skip", "bench,gpu", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="nothing to measure"):
        gpu.main(["--data", "x", "--skip", "bench,jax,torch", "--out", str(tmp_path)])


def test_gpu_continues_only_its_own_training_with_a_command_the_driver_accepts(tmp_path,
                                                                                monkeypatch):
    """A rerun used to add --resume to a fresh command (refused by the driver: '--data cannot
    be given with it') and then report the earlier run under this call's labels; another
    training in the folder (here: another --subset) is now refused before anything runs."""
    import importlib
    from core.config import configure
    data = tmp_path / "cifake"
    data.mkdir()
    run_dir = tmp_path / "out" / "jax_port-v3"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"preset": "v3", "subset": 50,
                                                     "data": str(data)}))
    (run_dir / "state.json").write_text("{}")
    cmds = []
    monkeypatch.setattr(gpu, "run_step", lambda name, cmd, out, limit: (
        cmds.append(cmd), {"step": name, "command": cmd[1:], "status": "done",
                           "wall_seconds": 0.0})[1])
    base = ["--data", str(data), "--out", str(tmp_path / "out"), "--skip", "bench,torch"]
    with pytest.raises(UserError, match="subset 50.*not this call's None"):
        gpu.main(base)
    assert cmds == []
    assert gpu.main(base + ["--subset", "50", "--epochs", "3"]) == 0
    argv = cmds[0][cmds[0].index("jax_port.train") + 1:]
    assert "--resume" in argv and "--preset" not in argv and "--data" not in argv
    stack = importlib.import_module("jax_port.train").JaxPort()
    assert configure(stack, argv)[2] is True  # the driver takes it as a resume


def _pair(d, name, cfg, secs, accs, val=None, complete=True):
    """A run as docs/results keeps it: <name>.config.json and <name>.metrics.json."""
    hist = [{"epoch": i + 1, "seconds": s, "test_acc": a, **({"val_acc": val} if val else {})}
            for i, (s, a) in enumerate(zip(secs, accs))]
    (d / f"{name}.config.json").write_text(json.dumps({"stack": "jax_port", "family": "cnn",
                                                       "device_kind": "cpu", **cfg}))
    (d / f"{name}.metrics.json").write_text(json.dumps(
        {"history": hist, "complete": complete, "final": {"test_acc": accs[-1]}}))


def test_frontier_rows_times_and_the_frontier_per_device(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    recipe = {"preset": "v3-recipe", "model": "v3", "epochs": 30, "lr": 2e-3, "dropout_p": None}
    _pair(runs, "slow-worse", {**recipe, "epochs": 50}, [30.0] * 2, [96.0, 96.5])
    _pair(runs, "fast", recipe, [10.0, 10.0], [95.0, 97.0])
    _pair(runs, "p0-val", {**recipe, "dropout_p": 0.0, "val": 5000}, [20.0, 20.0],
          [96.0, 97.5], val=97.1)
    _pair(runs, "cut", recipe, [5.0], [90.0], complete=False)
    mlp = {"family": "mlp", "preset": "mlp4-mini", "model": "mlp4", "device_kind": "cpu-mlp"}
    _pair(runs, "mlp-own", {**mlp, "hidden": PRESETS["mlp4-mini"]["hidden"]}, [1.0], [80.0])
    _pair(runs, "mlp-wide", {**mlp, "hidden": [64, 32, 16]}, [2.0], [82.0])
    _pair(runs, "mlp-bare", {**mlp, "preset": None, "hidden": [20, 7, 5]}, [0.5], [79.0])
    _pair(runs, "mlp-cut", mlp, [1.0], [70.0], complete=False)
    assert frontier.main([str(runs), "--out", str(tmp_path / "out"), "--no-chart"]) == 0
    rows = list(__import__("csv").DictReader((tmp_path / "out" / "frontier.csv").open()))
    assert [(r["run"], r["train_s"], r["frontier"]) for r in rows] == [
        ("v3-recipe", "20.0", "True"),                              # 10 + 10 s
        ("v3-recipe, dropout_p 0, val 5000", "40.0", "True"),
        ("v3-recipe, epochs 50", "60.0", "False"),                  # slower and worse
        ("mlp4", "0.5", "True"), ("mlp4-mini", "1.0", "True"),
        ("mlp4-mini, hidden 64-32-16", "2.0", "True")]  # neither a preset's widths nor,
    # without a preset, a model's own layout is named as a change
    assert rows[1]["val_acc"] == "97.1" and rows[0]["val_acc"] == ""
    out = capsys.readouterr().out
    assert "Unfinished, left out: " in out and "cut.metrics.json" in out
    assert frontier.main([str(runs), "--out", str(tmp_path / "cnn"), "--no-chart",
                          "--family", "cnn"]) == 0
    cnn = list(__import__("csv").DictReader((tmp_path / "cnn" / "frontier.csv").open()))
    assert [r["run"] for r in cnn] == [r["run"] for r in rows[:3]]   # the MLP runs left out
    out = capsys.readouterr().out   # unfinished: the CNN's listed, the MLP's not
    assert "cut.metrics.json" in out and "mlp-cut" not in out
    with pytest.raises(UserError, match="no finished mlp run under"):
        frontier.main([str(runs / "fast.config.json"), "--out", str(tmp_path / "x"),
                       "--family", "mlp"])
    (runs / "fast.metrics.json").write_text("{")
    with pytest.raises(UserError, match=r"fast\.metrics\.json: not valid JSON"):
        frontier.main([str(runs), "--out", str(tmp_path / "out")])
