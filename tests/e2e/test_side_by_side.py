"""bench.studies.side_by_side: the spec and JAX runs of a row side by side, time to the original."""
from __future__ import annotations

import json

from bench.studies import side_by_side as S


def _run(d, hist, final, complete=True):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"device": "cpu"}))
    (d / "metrics.json").write_text(json.dumps({"history": hist, "final": final,
                                                "complete": complete, "wall_seconds": 9.0}))


def test_time_to_original_counts_training_seconds_up_to_the_first_epoch_at_or_above():
    hist = [{"epoch": 1, "seconds": 10.0, "test_acc": 95.0},
            {"epoch": 2, "seconds": 12.0},  # not evaluated
            {"epoch": 3, "seconds": 11.0, "test_acc": 96.47},
            {"epoch": 4, "seconds": 10.0, "test_acc": 97.0}]
    assert S.time_to(hist, 96.47) == (3, 33.0)
    assert S.time_to(hist, 97.5) == (None, None)


def test_table_holds_both_stacks_and_marks_missing_and_unfinished(tmp_path):
    f = {"train_acc": 97.0, "test_acc": 96.5, "gap_pp": 0.5, "test_auc": 0.99,
         "test_dedup": {"accuracy": 96.4}}
    _run(tmp_path / "s" / "runs" / "torch_cnn-v3",
         [{"epoch": 1, "seconds": 5.0, "train_acc": 90.0, "test_acc": 96.0}], f)
    _run(tmp_path / "j" / "runs" / "jax_port-v3",
         [{"epoch": 1, "seconds": 1.0, "train_acc": 90.0, "test_acc": 96.6}],
         dict(f, test_acc=96.6), complete=False)
    code = S.main(["--spec", str(tmp_path / "s"), "--jax", str(tmp_path / "j"),
                   "--out", str(tmp_path / "o"), "--rows", "v3,baseline"])
    assert code == 0
    md = (tmp_path / "o" / "side_by_side.md").read_text()
    assert "unfinished (1 epochs)" in md and "missing" in md and "never" in md
    assert "epoch 1 (1 s)" in md
    doc = json.loads((tmp_path / "o" / "side_by_side.json").read_text())
    v3 = doc["rows"][0]
    assert abs(v3["jax_minus_spec_test_pp"] - 0.1) < 1e-9
    assert (tmp_path / "o" / "compare_v3.png").stat().st_size > 1000
    assert "baseline" in (tmp_path / "o" / "side_by_side.csv").read_text()


def test_seeds_table_averages_finished_runs_of_each_stack(tmp_path):
    f = {"train_acc": 97.0, "test_acc": 96.0, "gap_pp": 1.0, "test_auc": 0.99,
         "test_dedup": {"accuracy": 96.0}}
    h = [{"epoch": 1, "seconds": 1.0, "train_acc": 90.0, "test_acc": 95.0}]
    for name, acc in (("torch_cnn-v3", 96.0), ("torch_cnn-v3-s1", 96.5), ("torch_cnn-v3-s2", 97.0)):
        _run(tmp_path / "s" / "runs" / name, h, dict(f, test_acc=acc))
    _run(tmp_path / "j" / "runs" / "jax_port-v3", h, dict(f, test_acc=96.2))
    _run(tmp_path / "j" / "runs" / "jax_port-v3-s1", h, dict(f, test_acc=96.4))
    _run(tmp_path / "j" / "runs" / "jax_port-v3-s2", h, dict(f, test_acc=50.0), complete=False)
    (tmp_path / "j" / "runs" / "jax_port-v3-sx").mkdir()   # not a seed's folder: ignored
    _run(tmp_path / "s" / "runs" / "torch_cnn-baseline", h, f)  # one seed: no seeds row
    assert S.main(["--spec", str(tmp_path / "s"), "--jax", str(tmp_path / "j"),
                   "--out", str(tmp_path / "o"), "--rows", "v3,baseline"]) == 0
    doc = json.loads((tmp_path / "o" / "side_by_side.json").read_text())
    [v3] = doc["seeds"]
    assert v3["row"] == "v3" and v3["spec"]["n"] == 3 and v3["jax"]["n"] == 2
    assert abs(v3["spec"]["mean"] - 96.5) < 1e-9 and abs(v3["spec"]["std"] - 0.5) < 1e-9
    assert abs(v3["jax"]["mean"] - 96.3) < 1e-9
    assert abs(v3["jax_minus_spec_mean_pp"] + 0.2) < 1e-9
    se = ((0.5 ** 2 / 3) + (0.2 ** 2 / 2 / 2)) ** 0.5  # std of (96.2, 96.4) is 0.1414
    assert abs(v3["se_difference_pp"] - se) < 1e-9
    md = (tmp_path / "o" / "seeds.md").read_text()
    assert "s2: 50.00 (unfinished (1 epochs))" in md and "96.50 ± 0.50 (n = 3)" in md
    assert "-0.20 ±" in md and "baseline" not in md.split("|---|")[-1]


def test_runs_smaller_than_the_original_are_labelled_and_not_compared(tmp_path):
    """A bench.studies.reproduce miniature (--subset, --epochs-scale) used to be shown as a full
    CIFAKE result and compared with a full run."""
    f = {"train_acc": 97.0, "test_acc": 96.5, "gap_pp": 0.5, "test_auc": 0.99,
         "test_dedup": {"accuracy": 96.4}}
    h = [{"epoch": 1, "seconds": 5.0, "train_acc": 90.0, "test_acc": 96.0}]
    _run(tmp_path / "s" / "runs" / "torch_cnn-v3", h, f)
    (tmp_path / "s" / "runs" / "torch_cnn-v3" / "config.json").write_text(
        json.dumps({"device": "cpu", "subset": 100, "epochs": 1}))
    _run(tmp_path / "j" / "runs" / "jax_port-v3", h, dict(f, test_acc=96.6))
    assert S.main(["--spec", str(tmp_path / "s"), "--jax", str(tmp_path / "j"),
                   "--out", str(tmp_path / "o"), "--rows", "v3"]) == 0
    doc = json.loads((tmp_path / "o" / "side_by_side.json").read_text())
    assert doc["rows"][0]["jax_minus_spec_test_pp"] is None
    assert "full CIFAKE" not in doc["title"]
    md = (tmp_path / "o" / "side_by_side.md").read_text()
    assert "complete, subset 100/class, 1 of 50 epochs" in md
