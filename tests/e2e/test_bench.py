"""bench.compare: the JSON/table it writes, its refusals, the synthetic-data path, the headline figures.

The end-to-end runs are kept small with flags (1 repeat, 1 step, a few eval images, a tiny
budget); they still start one worker process per backend, so the all-backends run is the
slow one here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import compare
from bench.speed import machine
from bench.speed.backends import BACKENDS
from bench.speed.machine import roofline_fraction, train_flops
from data.errors import UserError, run_cli
from tests.helpers import require, REPO, make_archive
from tests.helpers import env as helpers_env

SMALL = ["--quick", "--repeats", "1", "--steps", "1", "--eval-images", "6", "--budget-epochs", "1",
         "--budget-subset", "6"]


# ------------------------------------------------------------------ schema validator
def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_spread(s: dict, where: str) -> None:
    for k in ("median", "min", "max"):
        assert _num(s[k]) and s[k] > 0, f"{where}.{k} = {s.get(k)!r}"
    assert s["min"] <= s["median"] <= s["max"], where
    assert isinstance(s["values"], list) and len(s["values"]) == s["n"] >= 1, where


def validate_bench(doc: dict, expect_rows: set[tuple[str, str, str]], accuracy: bool) -> None:
    """Required keys and types of bench.json, per row."""
    for k, t in (("schema", str), ("timestamp", str), ("command", str), ("config", dict),
                 ("data", dict), ("environment", dict), ("methods", dict), ("rows", list),
                 ("headlines", list), ("notes", list)):
        assert isinstance(doc.get(k), t), f"top-level {k!r} missing or not {t.__name__}"
    assert doc["schema"] == compare.SCHEMA
    assert _num(doc["wall_seconds"]) and doc["wall_seconds"] > 0
    env = doc["environment"]
    for k in ("cpu_model", "python", "numpy", "torch", "jax", "flax", "threads", "git"):
        assert env.get(k) is not None, f"environment.{k} missing"
    assert "commit" in env["git"]
    assert isinstance(doc["data"]["synthetic"], bool) and doc["data"]["synthetic"] != accuracy
    got = {(r["backend"], r["device"], r["model"]) for r in doc["rows"] if r["n_devices"] == 1}
    assert got == expect_rows, f"rows {sorted(got)} != requested {sorted(expect_rows)}"
    for r in doc["rows"]:
        w = f"{r['backend']}/{r['device']}/{r['model']}"
        assert r["ok"] is True, f"{w} failed: {r.get('error')}"
        assert isinstance(r["n_devices"], int) and r["n_devices"] >= 1, w
        eff = r["train"]["scaling_efficiency"]
        assert (eff is None) == (r["n_devices"] == 1) and (eff is None or _num(eff)), w
        assert r["family"] == BACKENDS[r["backend"]].family
        _check_spread(r["train"]["images_per_s"], f"{w}.train.images_per_s")
        _check_spread(r["eval"]["images_per_s"], f"{w}.eval.images_per_s")
        assert isinstance(r["train"]["how"], str)
        if BACKENDS[r["backend"]].jit:   # JIT: compilation reported apart
            assert _num(r["train"]["compile_s"]) and r["train"]["warmup_s"] is None, w
        else:
            assert r["train"]["compile_s"] is None and _num(r["train"]["warmup_s"]), w
        assert r["train"]["ratio_vs_reference"] is None or _num(r["train"]["ratio_vs_reference"])
        assert r["epoch"]["how"] in ("measured", "estimated") and r["epoch"]["seconds"] > 0
        assert r["epoch"]["how"] == ("measured" if r["family"] == "mlp" else "estimated"), w
        assert _num(r["memory"]["peak_rss_mib"]) and r["memory"]["peak_rss_mib"] > 0
        assert r["parity"]["status"] in ("reference", "pass", "FAIL", "error", "not run"), w
        if accuracy:
            b = r["budget"]
            assert 0.0 <= b["test_accuracy"] <= 100.0 and b["n_test"] == doc["data"]["n_test"]
            assert sum(map(sum, b["test_confusion"])) == b["n_test"]
        else:
            assert r["budget"] is None, w
    m = doc["machine"]  # measured before and after the rows, in the same run
    for k in ("sgemm_gflops", "copy_gbps", "copy_cache_gbps"):
        assert _num(m[k]) and m[k] > 0 and m[k] == max(m["before"][k], m["after"][k]), k
    for r in doc["rows"]:
        roof = r["train"]["roofline"]
        assert (roof is None) == (r["device"] != "cpu"), r["backend"]
        assert roof is None or roof == pytest.approx(
            r["train"]["images_per_s"]["median"] * train_flops(r["model"]) / (m["sgemm_gflops"] * 1e9))
    for g in doc["headlines"]:  # measured figures only: no targets, no verdicts
        assert set(g) >= {"what", "value", "unit", "how"} and "status" not in g
        assert g["value"] is None or _num(g["value"])


def _run(argv, capsys):
    """bench.compare in-process, as its __main__ runs it -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_cli(compare.main, argv, prog=compare.PROG)
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_run_on_a_tiny_archive_reports_every_backend(tmp_path, cache_dir, capsys):
    z = make_archive(tmp_path / "tiny.zip")
    out = tmp_path / "res"
    rc, stdout, _ = _run(SMALL + ["--data", str(z), "--cache-dir", str(cache_dir), "--out",
                                  str(out), "--models", "mlp2,baseline", "--no-parity"], capsys)
    assert rc == 0
    doc = json.loads((out / "bench.json").read_text())
    validate_bench(doc, {(b, "cpu", "mlp2" if i.family == "mlp" else "baseline")
                         for b, i in BACKENDS.items()}, accuracy=True)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.txt").read_text().strip() == stdout.split("\nwrote ")[0].strip()
    for b in BACKENDS:
        assert b in stdout
    assert "(est.)" in stdout and "headline figures (this run):" in stdout
    assert "MISS" not in stdout and "PASS" not in stdout
    # references are 1.00x of themselves; the ratios come from the same run
    ref = {r["backend"]: r for r in doc["rows"]}
    assert ref["numpy-mlp"]["train"]["ratio_vs_reference"] == 1.0
    assert ref["jax-cnn"]["train"]["ratio_vs_reference"] == pytest.approx(
        ref["jax-cnn"]["train"]["images_per_s"]["median"]
        / ref["torch-torchvision"]["train"]["images_per_s"]["median"])


def test_quick_run_on_the_mini_archive_with_parity(mini_zip, tmp_path, cache_dir, capsys):
    out = tmp_path / "res"
    rc, stdout, _ = _run(["--quick", "--repeats", "2", "--budget-epochs", "1", "--budget-subset",
                          "100", "--eval-images", "200", "--data", str(mini_zip), "--cache-dir",
                          str(cache_dir), "--out", str(out), "--backends", "numpy-mlp,jax-mlp",
                          "--models", "mlp2", "--no-chart", "--budget-seeds", "2"], capsys)
    assert rc == 0
    doc = json.loads((out / "bench.json").read_text())
    validate_bench(doc, {("numpy-mlp", "cpu", "mlp2"), ("jax-mlp", "cpu", "mlp2")}, accuracy=True)
    assert doc["data"]["n_test"] == 1000 and doc["rows"][0]["budget"]["n_train"] == 200
    rows = {r["backend"]: r for r in doc["rows"]}
    assert rows["numpy-mlp"]["parity"]["status"] == "reference"
    assert rows["jax-mlp"]["parity"]["status"] == "pass", doc["parity"]
    assert doc["parity"]["checks"]["mlp2"]["passed"] is True
    # the budget over two seeds: the mean ± sample std of the seeds' accuracies, each seed
    # from its own initial weights and batch order, the same in both stacks, which agree
    for b in rows.values():
        bud = b["budget"]
        accs = [p["test_accuracy"] for p in bud["per_seed"]]
        assert bud["seeds"] == [0, 1] and [p["seed"] for p in bud["per_seed"]] == [0, 1]
        assert bud["test_accuracy"] == pytest.approx(sum(accs) / 2)
        assert bud["test_accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    for s in (0, 1):
        assert rows["jax-mlp"]["budget"]["per_seed"][s]["test_accuracy"] == pytest.approx(
            rows["numpy-mlp"]["budget"]["per_seed"][s]["test_accuracy"], abs=0.5)
    assert rows["numpy-mlp"]["budget"]["per_seed"][0]["final_train_loss"] != \
        rows["numpy-mlp"]["budget"]["per_seed"][1]["final_train_loss"]  # two seeds, two runs
    assert " ± " in stdout and "mean ± sample std over seeds 0-1" in stdout
    assert not (out / "bench.png").exists()
    # the full-batch figure: both stacks train the same epochs from the same weights
    fb = {b: rows[b]["full_batch"] for b in rows}
    for f in fb.values():
        assert f["n_images"] == 4000 and f["epochs"] == 3 and f["seconds"]["n"] == 2
        assert f["hyperparameters"]["preset"] == "mlp2-full"
    assert fb["jax-mlp"]["final_train_loss"] == pytest.approx(
        fb["numpy-mlp"]["final_train_loss"], rel=1e-4)
    assert "full-batch epoch, mlp2 on cpu (4,000 images, mlp2-full lr): numpy-mlp" in stdout


def test_without_cifake_it_measures_synthetic_images_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CIFAKE_PATH", raising=False)
    out = tmp_path / "res"
    rc, stdout, _ = _run(SMALL + ["--out", str(out), "--backends", "numpy-mlp", "--models",
                                  "mlp2", "--no-parity"], capsys)
    assert rc == 0
    doc = json.loads((out / "bench.json").read_text())
    validate_bench(doc, {("numpy-mlp", "cpu", "mlp2")}, accuracy=False)
    assert doc["data"]["synthetic"] and "no CIFAKE found" in doc["data"]["how"]
    assert "SYNTHETIC" in stdout and "Accuracy columns are absent" in stdout
    assert compare.KAGGLE_URL in stdout and "CIFAKE_PATH" in stdout
    assert "absent" in stdout.splitlines()[2]  # the row's accuracy cell


def test_data_resolution_order(tmp_path, monkeypatch):
    """--data none / --synthetic > --data PATH > $CIFAKE_PATH > synthetic; no path of the
    developers' layout is a default (``make bench`` passes it)."""
    ap = compare.build_parser()
    z = make_archive(tmp_path / "a.zip", n_train=1, n_test=1)
    monkeypatch.setenv("CIFAKE_PATH", str(z))
    assert compare.resolve_data(ap.parse_args(["--data", "none"]))[0] is None
    assert compare.resolve_data(ap.parse_args(["--synthetic", "--data", str(z)]))[0] is None
    assert compare.resolve_data(ap.parse_args([])) == (str(z), "$CIFAKE_PATH")
    monkeypatch.delenv("CIFAKE_PATH")
    assert compare.resolve_data(ap.parse_args([]))[0] is None
    assert compare.resolve_data(ap.parse_args(["--quick"]))[0] is None


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("argv, needle", [
    (["--backends", "numpy-mlp,tensorflow"], "unknown backend 'tensorflow'"),
    (["--devices", "tpu"], "unknown device 'tpu'"),
    (["--models", "resnet"], "unknown model 'resnet'"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--data", "/no/such/cifake.zip"], "/no/such/cifake.zip"),
    (["--backends", "numpy-mlp", "--models", "v3"], "none of the chosen backends"),
])
def test_bad_choices_fail_with_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    rc, out, err = _run(argv + ["--out", str(tmp_path / "r"), "--data", "none"]
                        if "--data" not in argv else argv + ["--out", str(tmp_path / "r")], capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and err.startswith("error: ")
    assert "Traceback" not in err


def test_the_module_entry_point_refuses_unknown_backends():
    p = subprocess.run([sys.executable, "-m", "bench.compare", "--backends", "nope"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "unknown backend" in p.stderr


def test_explicit_gpu_without_a_gpu_is_an_error(tmp_path, capsys):
    torch = require("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # torch backends only: the probe imports torch alone (fast)
    rc, _, err = _run(["--devices", "gpu", "--backends", "torch-device", "--models", "v3",
                       "--data", "none", "--out", str(tmp_path / "r")], capsys)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and "--devices gpu: torch sees no GPU" in last


# ------------------------------------------------------------------ analysis (no workers)
def _row(backend, device, model, ips, epoch_s, how="measured", n=100_000):
    fam = BACKENDS[backend].family
    s = {"median": ips, "min": ips, "max": ips, "values": [ips], "n": 1}
    return {"ok": True, "backend": backend, "device": device, "model": model, "family": fam,
            "train": {"images_per_s": s}, "eval": {"images_per_s": s},
            "epoch": {"seconds": epoch_s, "n_images": n, "how": how}}


def test_headlines_are_the_measured_ratios():
    rows = [_row("torch-torchvision", "cpu", "v3", 1000.0, 100.0, "estimated"),
            _row("torch-device", "cpu", "v3", 1500.0, 66.0, "estimated"),
            _row("jax-cnn", "cpu", "v3", 2500.0, 40.0, "estimated"),
            _row("numpy-mlp", "cpu", "mlp4", 50_000.0, 2.0),
            _row("jax-mlp", "cpu", "mlp4", 100_000.0, 1.0)]
    vs_torch, ips, roof, mlp = compare.headlines(rows, ["mlp4", "v3"])  # no GPU: no GPU line
    # against the FASTEST torch row of the run
    assert vs_torch["value"] == pytest.approx(2500 / 1500, 1e-3)
    assert "torch-device of 2" in vs_torch["what"]
    tuned = rows + [_row("torch-device-cl", "cpu", "v3", 1800.0, 55.0, "estimated")]
    g2 = compare.headlines(tuned, ["mlp4", "v3"])[0]
    assert g2["value"] == pytest.approx(2500 / 1800, 1e-3) and "torch-device-cl" in g2["what"]
    assert ips["value"] == 2500.0 and mlp["value"] == 2.0   # 2 s / 1 s
    assert roof["value"] is None                            # no machine measured
    compare.add_roofline(rows, {"sgemm_gflops": 100.0})
    flops = train_flops("v3")
    assert compare.headlines(rows, ["v3"])[2]["value"] == pytest.approx(
        100 * 2500 * flops / 100e9, abs=0.05)


def test_training_flops_count_the_products_of_each_pass():
    # v3 per image, multiply-adds: conv1 32*32*27*32, conv2 16*16*288*64, fc1 4096*512, fc2 512;
    # training = forward + weight gradients + input gradients of all but conv1, 2 FLOPs each
    macs = [32 * 32 * 27 * 32, 16 * 16 * 288 * 64, 4096 * 512, 512]
    assert train_flops("v3") == train_flops("baseline") == 2 * (2 * sum(macs) + sum(macs[1:]))
    assert train_flops("v3") == 44_436_480
    dims = [3072, 20, 7, 5, 1]  # mlp4's own widths (the model the bench times)
    macs = [a * b for a, b in zip(dims, dims[1:])]
    assert train_flops("mlp4") == 2 * (2 * sum(macs) + sum(macs[1:]))
    assert roofline_fraction("v3", 1000.0, 44.43648) == pytest.approx(1.0)
    assert roofline_fraction("v3", None, 100.0) is None and roofline_fraction("v3", 1.0, None) is None


def test_machine_measurements_are_positive_rates():
    m = machine.measure()
    assert m["sgemm_gflops"] > 1 and m["copy_gbps"] > 0.1 and m["copy_cache_gbps"] > 0.1
    assert "sgemm" in m["how"] and "MiB" in m["how"]


def test_gpu_headline_extrapolates_50_epochs_and_is_labelled_estimated():
    rows = [_row("jax-cnn", "gpu", "v3", 400_000.0, 0.25, "estimated"),
            _row("torch-torchvision", "gpu", "v3", 20_000.0, 5.0, "estimated")]
    gpu = compare.headlines(rows, ["v3"])[-1]
    assert gpu["what"].startswith("gpu:") and gpu["value"] == pytest.approx(12.5)
    assert gpu["torch_torchvision_s"] == 250.0 and "estimated" in gpu["how"]


def test_missing_backends_leave_headlines_and_ratios_empty():
    rows = [_row("jax-cnn", "cpu", "v3", 3000.0, 33.0, "estimated")]
    compare.add_ratios(rows)
    assert rows[0]["train"]["ratio_vs_reference"] is None and rows[0]["reference"] is None
    assert [x["value"] for x in compare.headlines(rows, ["v3"])] == [None, 3000.0, None, None]


def test_a_ratio_to_a_reference_on_another_device_says_so():
    gpu, cpu = _row("jax-cnn", "gpu", "v3", 40_000.0, 2.5), \
        _row("torch-torchvision", "cpu", "v3", 1_000.0, 100.0)
    same = _row("jax-cnn", "cpu", "v3", 3_000.0, 33.0)
    compare.add_ratios([gpu, cpu, same])
    assert gpu["reference"] == "torch-torchvision/cpu"
    assert compare.ratio_cell(gpu) == "40.00x vs cpu" and compare.ratio_cell(same) == "3.00x"


def test_full_batch_line_names_a_multi_device_row():
    def fb(s):
        return {"seconds": {"median": s, "min": s, "max": s}, "n_images": 100,
                "hyperparameters": {"preset": "mlp4-full"}}
    rows = [dict(_row("numpy-mlp", "cpu", "mlp4", 1.0, 1.0), full_batch=fb(1.0)),
            dict(_row("jax-mlp", "cpu", "mlp4", 1.0, 1.0), full_batch=fb(0.25)),
            dict(_row("jax-mlp", "cpu", "mlp4", 1.0, 1.0), full_batch=fb(0.5), n_devices=2)]
    [line] = compare.full_batch_lines(rows)
    assert "jax-mlp 0.250 s [0.250-0.250], 4.00x" in line
    assert "jax-mlp (2 devices) 0.500 s [0.500-0.500], 2.00x" in line


# ------------------------------------------------------------------ several devices
def test_rows_on_several_devices_are_planned_where_a_library_sees_several():
    ap = compare.build_parser()
    args = ap.parse_args(["--backends", "jax-cnn,torch-device,torch-device-cl,jax-mlp",
                          "--models", "mlp2,v3", "--devices", "cpu,gpu"])
    probe = {"torch_cuda": True, "torch_gpu_count": 8, "jax_gpu": "H100", "jax_gpu_count": 8,
             "jax_cpu_count": 2}
    runs, _ = compare.plan_runs(args, probe)
    assert ("jax-mlp", "cpu", "mlp2", 2) in runs and ("jax-cnn", "gpu", "v3", 8) in runs
    assert ("torch-device", "gpu", "v3", 8) in runs
    assert ("torch-device", "cpu", "v3", 2) not in runs  # torch sees one CPU device
    assert not any(b == "torch-device-cl" and n > 1 for b, _, _, n in runs)  # 1-device only
    assert all((b, d, m, 1) in runs for b, d, m, _ in runs)
    assert compare.worker_argv("torch-device", {"n_devices": 8})[:4] == [
        "torch.distributed.run", "--standalone", "--nproc-per-node", "8"]
    assert compare.worker_argv("jax-cnn", {"n_devices": 8})[0] == "bench.speed.worker"
    args = ap.parse_args(["--backends", "jax-cnn", "--models", "v3", "--devices", "cpu",
                          "--no-scaling"])
    assert compare.plan_runs(args, probe)[0] == [("jax-cnn", "cpu", "v3", 1)]


def test_scaling_efficiency_is_n_device_throughput_over_n_times_one():
    one, two = _row("jax-cnn", "gpu", "v3", 1000, 1.0), _row("jax-cnn", "gpu", "v3", 1500, 1.0)
    two["n_devices"] = 2
    alone = _row("torch-device", "gpu", "v3", 500, 1.0)
    alone["n_devices"] = 4  # no 1-device row to compare with
    rows = [one, two, alone]
    compare.add_scaling(rows)
    assert one["train"]["scaling_efficiency"] is None
    assert two["train"]["scaling_efficiency"] == pytest.approx(0.75)
    assert alone["train"]["scaling_efficiency"] is None
    # ratios and headlines are between 1-device rows: the 2-device row does not replace its twin
    compare.add_ratios(rows)
    assert compare._one_device(rows)[("jax-cnn", "gpu", "v3")] is one


def test_jax_on_two_forced_host_devices_reports_its_scaling(tmp_path):
    """XLA_FLAGS must reach the workers before jax is imported: a subprocess."""
    out = tmp_path / "res"
    p = subprocess.run([sys.executable, "-m", "bench.compare", *SMALL, "--data", "none",
                        "--out", str(out), "--backends", "jax-mlp", "--models", "mlp2",
                        "--no-parity", "--no-chart"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=helpers_env(
                           XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    validate_bench(doc, {("jax-mlp", "cpu", "mlp2")}, accuracy=False)
    assert sorted(r["n_devices"] for r in doc["rows"]) == [1, 2]
    two = next(r for r in doc["rows"] if r["n_devices"] == 2)
    assert two["device_name"].startswith("2 x cpu")
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("jax-mlp") and "  2  " in ln)
    assert f"{two['train']['scaling_efficiency']:.2f}" in line
    assert "forced host devices" in p.stdout


def test_torch_device_on_two_processes_reports_one_row(tmp_path):
    """The bench's DDP worker under torchrun (gloo), as a GPU machine runs it per GPU."""
    require("torch")
    z = make_archive(tmp_path / "tiny.zip", n_train=40, n_test=5)
    spec = {"backend": "torch-device", "device": "cpu", "model": "v3", "n_devices": 2,
            "data": str(z), "cache_dir": str(tmp_path / "cache"), "repeats": 1, "steps": 2,
            "eval_images": 10, "budget_epochs": 1, "budget_subset": 10, "synthetic_train": 0,
            "synthetic_test": 0, "seed": 0, "measure_cnn_epoch": False, "init_weights": None}
    res, err = compare.run_worker(compare.worker_argv("torch-device", spec),
                                  helpers_env(), 300)
    assert res is not None and res["ok"], err or res
    assert res["n_devices"] == 2 and res["device_name"] == "2 x cpu"
    assert res["budget"]["n_train"] == 20 and res["budget"]["n_test"] == 10


def test_jax_conv_chooses_the_timed_formulation_and_its_parity_check():
    require("jax")
    from bench.speed.backends import make_backend
    assert make_backend("jax-cnn", "v3", "cpu", conv_impl="im2col").cfg.conv_impl == "im2col"
    assert make_backend("jax-cnn", "v3", "cpu").cfg.conv_impl == "hybrid"   # the CPU default
    args = compare.build_parser().parse_args(["--jax-conv", "im2col", "--backends", "jax-cnn",
                                              "--models", "v3"])
    assert compare._config(args)[0]["jax_conv"] == "im2col"
    with pytest.raises(UserError, match="--jax-conv: invalid choice: 'winograd'"):
        compare.build_parser().parse_args(["--jax-conv", "winograd"])
