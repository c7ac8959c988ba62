"""bench.studies.sweep end to end: variants trained on a validation split, the choice read
off validation only, resumable, and never mixed with another command's runs."""
import json

import pytest

from bench.studies import sweep
from data.errors import UserError


def test_sweep_chooses_on_validation_resumes_and_refuses_other_runs(mini_zip, tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["--stack", "numpy_mlp", "--preset", "mlp2-mini", "--val", "20", "--seeds", "0,1",
            "--common", "--epochs 2 --subset 40", "--try", "--hidden 3", "--try", "--hidden 9",
            "--data", str(mini_zip), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert sweep.main(args) == 0
    got = json.loads((out / "sweep.json").read_text())
    assert [(r["variant"], r["seed"], r["status"]) for r in got["records"]] == [
        ("--hidden 3", 0, "done"), ("--hidden 3", 1, "done"),
        ("--hidden 9", 0, "done"), ("--hidden 9", 1, "done")]
    means = {}
    for v in ("hidden-3", "hidden-9"):  # recomputed from the runs' own files
        vals = []
        for s in (0, 1):
            run = out / "runs" / f"{v}-s{s}"
            cfg = json.loads((run / "config.json").read_text())
            assert (cfg["val"], cfg["epochs"], cfg["hidden"], cfg["seed"]) == (
                20, 2, [int(v[7:])], s)
            vals.append(json.loads((run / "metrics.json").read_text())["history"][-1]["val_acc"])
        means[f"--hidden {v[7:]}"] = sum(vals) / 2
    assert got["means"] == pytest.approx(means)
    top = [v for v, m in means.items() if m == max(means.values())]
    assert (got["chosen"], got["tied"]) == ((top[0], []) if len(top) == 1 else (None, top))
    assert "is not used to choose" in (out / "sweep.md").read_text()

    capsys.readouterr()
    assert sweep.main(args) == 0                       # finished runs are not run again
    assert [r["status"] for r in json.loads((out / "sweep.json").read_text())["records"]] \
        == ["skipped"] * 4
    other = [a if a != "--epochs 2 --subset 40" else "--epochs 3 --subset 40" for a in args]
    with pytest.raises(UserError, match=r"hidden-3-s0 was made by another command"):
        sweep.main(other)


def test_sweep_refuses_bad_arguments_before_any_run(tmp_path):
    def argv(**kw):
        a = {"stack": "numpy_mlp", "preset": "mlp2-mini", "val": "20", "seeds": "0",
             "data": str(tmp_path), "out": str(tmp_path / "o"), **kw}
        return [x for k, v in a.items() for x in (f"--{k}", v)] + ["--try", "--hidden 3"]
    with pytest.raises(UserError, match="--val must be a positive integer"):
        sweep.main(argv(val="0"))                      # a sweep without a validation split
    with pytest.raises(UserError, match="--try values must differ"):
        sweep.main(argv() + ["--try", "--hidden  3"])
    with pytest.raises(UserError, match="--seeds lists a seed twice"):
        sweep.main(argv(seeds="0,0"))
    assert not (tmp_path / "o").exists()


def test_sweep_chooses_on_the_validation_battery_when_asked(mini_zip, tmp_path):
    """--choose battery: every finished run's battery on its validation images, scored once;
    the choice is the highest mean over the battery's conditions, recomputed here from the
    runs' own battery-val.json."""
    out = tmp_path / "swb"
    args = ["--stack", "numpy_mlp", "--preset", "mlp2-mini", "--val", "20", "--seeds", "0",
            "--common", "--epochs 1 --subset 40", "--try", "--hidden 3", "--try", "--hidden 9",
            "--data", str(mini_zip), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            "--choose", "battery"]
    assert sweep.main(args) == 0
    got = json.loads((out / "sweep.json").read_text())
    assert got["criterion"] == "battery_mean"
    means, stamps = {}, {}
    for r in got["records"]:
        path = out / "runs" / f"{sweep.slug(r['variant'])}-s0" / "battery-val.json"
        res = json.loads(path.read_text())
        assert res["data"]["split"] == "val" and res["data"]["n"] == 20
        accs = [row["accuracy"] for row in res["rows"]]
        assert len(accs) == 13 and r["battery_mean"] == pytest.approx(sum(accs) / 13)
        assert r["battery_worst"] == min(accs)
        means[r["variant"]] = r["battery_mean"]
        stamps[path] = path.stat().st_mtime_ns
    assert got["means"] == pytest.approx(means)
    top = [v for v, m in means.items() if m == max(means.values())]
    assert (got["chosen"], got["tied"]) == ((top[0], []) if len(top) == 1 else (None, top))
    assert "robustness battery" in (out / "sweep.md").read_text()
    assert sweep.main(args) == 0                       # neither trained nor scored again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
