"""The v3 recipe beyond the original: the shared per-step formulas (core/recipe.py) against
optax, the recipe's flags and resume rule in the run driver, both stacks' recipe runs
(bit-identical resume, the moving average saved and evaluated, TTA in predict), and
bench.studies.recipe's ablation on a miniature. Parity of the two stacks' arithmetic is in
test_parity_cnn.py."""
from __future__ import annotations

import csv
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.catalog import DEFAULTS, ONECYCLE_KEYS, PRESETS, RECIPE_DEFAULTS
from data.errors import UserError
from core.recipe import StepSchedule, ema_decay_at, onecycle_lr, smooth_targets
from core.tensors import load_safetensors
from core.rundir import RUN_FORMAT
from tests.helpers import assert_same_weights, assert_user_error, make_archive, run, \
    synthetic_image, train_argv


# ------------------------------------------------------------------ the formulas
@pytest.mark.parametrize("total, frac, div, final", [(100, 0.15, 10.0, 100.0),
                                                     (47, 0.3, 25.0, 1e4), (10, 0.0, 10.0, 100.0),
                                                     (7, 0.99, 3.0, 2.0), (1, 0.5, 10.0, 10.0)])
def test_onecycle_is_optax_cosine_onecycle_schedule(total, frac, div, final):
    peak = 2e-3
    steps = np.arange(total + 3)
    want = np.asarray(jax.vmap(optax.cosine_onecycle_schedule(total, peak, frac, div, final))(
        jnp.asarray(steps)), np.float64)
    got = onecycle_lr(steps, total, peak, frac, div, final)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * peak)  # optax: float32
    warm = int(frac * total)  # no warm-up steps: the first step is already at the peak
    assert got[0] == pytest.approx(peak / div if warm else peak)
    assert got[-1] == pytest.approx(peak / div / final)
    assert onecycle_lr(int(frac * total), total, peak, frac, div, final) == \
        pytest.approx(peak if int(frac * total) < total else peak / div / final)


def test_linear_warmup_is_optax_linear_then_cosine_decay():
    total, frac, peak, div, final = 40, 0.25, 1e-3, 10.0, 100.0
    w = int(frac * total)
    ref = optax.join_schedules(
        [optax.linear_schedule(peak / div, peak, w),
         optax.cosine_decay_schedule(peak, total - w, alpha=1.0 / (div * final))], [w])
    steps = np.arange(total + 2)
    want = np.asarray(jax.vmap(ref)(jnp.asarray(steps)), np.float64)
    got = onecycle_lr(steps, total, peak, frac, div, final, warmup_shape="linear")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_step_schedule_from_a_config():
    cfg = {**PRESETS["v3-recipe"], "epochs": 3}
    s = StepSchedule.from_config(cfg, steps_per_epoch=5)
    assert s.varies and s.total_steps == 15 and s.ema == 0.999
    assert s.lr(0) == pytest.approx(2e-4) and max(s.lr(np.arange(15))) <= 2e-3
    c = StepSchedule.from_config({"lr": 1e-3, "epochs": 50, **RECIPE_DEFAULTS}, 7)
    assert not c.varies and c.lr(123) == 1e-3 and c.ema == 0.0 and c.ema_decay(5) == 0.0
    assert np.array_equal(c.lr(np.arange(3)), np.full(3, 1e-3))


def test_ema_decay_gives_optax_bias_corrected_average():
    """ema <- d_t ema + (1 - d_t) w with d_t = ema_decay_at(d, t) is the zero-started,
    bias-corrected average optax.ema(d, debias=True) returns, from the first step on."""
    d = 0.9
    ws = np.random.default_rng(0).standard_normal((25, 6))
    tx = optax.ema(d, debias=True)
    st = tx.init(jnp.zeros(6))
    avg = np.full(6, np.nan)  # the start value never counts: d_1 = 0
    for t, w in enumerate(ws, 1):
        want, st = tx.update(jnp.asarray(w, jnp.float32), st)
        dt = ema_decay_at(d, t)
        avg = w.copy() if t == 1 else dt * avg + (1 - dt) * w
        np.testing.assert_allclose(avg, np.asarray(want), rtol=1e-5, atol=1e-6)
    assert ema_decay_at(d, 1) == 0.0 and ema_decay_at(d, 10_000) == pytest.approx(d)


def test_smooth_targets():
    y = np.array([0.0, 1.0], np.float32)
    assert smooth_targets(y, 0.0) is y
    np.testing.assert_allclose(smooth_targets(y, 0.1), [0.05, 0.95], rtol=1e-6)


# ------------------------------------------------------------------ presets and flags
def test_original_presets_are_untouched_and_the_recipe_is_v3():
    assert PRESETS["v3"] == {"model": "v3", "epochs": 50, "batch_size": 64, "lr": 1e-3}
    r = PRESETS["v3-recipe"]
    assert r["model"] == "v3" and r["epochs"] <= 30 and set(RECIPE_DEFAULTS) <= set(r)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    return make_archive(d / "tiny.zip", n_train=12, n_test=4), d / "cache"


def train(stack, archive, out, *extra, fresh=("--preset", "v3-recipe", "--batch-size", "8",
                                              "--epochs", "3")):
    zip_path, cache = archive
    argv = train_argv(zip_path, cache, out, *extra, fresh=fresh)
    try:
        return importlib.import_module(f"{stack}.train").main(argv), None
    except UserError as e:
        return 2, str(e)


@pytest.mark.parametrize("stack, flags, needle", [
    ("torch_cnn", ("--model", "v3", "--warmup-frac", "0.2"),
     "--warmup-frac 0.2 applies to --schedule onecycle only"),
    ("jax_port", ("--preset", "v3-recipe", "--schedule", "constant", "--warmup-frac", "0.2"),
     "--warmup-frac 0.2 applies to --schedule onecycle only"),
    ("torch_cnn", ("--model", "v3", "--label-smoothing", "1"), "--label-smoothing must be in [0, 1)"),
    ("jax_port", ("--model", "v3", "--ema-decay", "-0.5"), "--ema-decay must be"),
    ("torch_cnn", ("--model", "v3", "--div-factor", "0.5"), "--div-factor must be in [1, "),
    ("torch_cnn", ("--model", "v3", "--tta", "rotate"), "invalid choice: 'rotate'"),
    ("jax_port", ("--model", "mlp2", "--label-smoothing", "0.1"),
     "--label-smoothing applies to the CNN models only"),
    ("jax_port", ("--model", "mlp2", "--schedule", "onecycle"),
     "--schedule applies to the CNN models only"),
    ("torch_cnn", ("--model", "baseline", "--dropout-p", "0.2"),
     "--dropout-p applies to the models with a dropout layer only (dropout, v3), not baseline"),
    ("jax_port", ("--model", "baseline", "--dropout-p", "0"),
     "--dropout-p applies to the models with a dropout layer only"),
    ("jax_port", ("--model", "v3", "--dropout-p", "1"), "--dropout-p must be in [0, 1)"),
    ("jax_port", ("--model", "mlp2", "--dropout-p", "0.1"),
     "--dropout-p applies to the CNN models only"),
])
def test_recipe_flags_refuse_what_they_cannot_honour(stack, flags, needle, archive, tmp_path):
    code, err = train(stack, archive, tmp_path / "r", fresh=flags)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stack", ["torch_cnn", "jax_port"])
def test_a_preset_schedule_is_overridden_with_its_settings(stack):
    """--preset v3-recipe --schedule constant: the preset's one-cycle settings go with its
    schedule (it used to be refused for a --warmup-frac nobody typed); the rest of the
    preset stays."""
    from core.config import configure
    st = {"torch_cnn": lambda: importlib.import_module("torch_cnn.train").TorchCNN(),
          "jax_port": lambda: importlib.import_module("jax_port.train").JaxPort()}[stack]()
    cfg = configure(st, ["--preset", "v3-recipe", "--schedule", "constant"])[0]
    assert cfg["schedule"] == "constant" and cfg["lr"] == 2e-3
    assert all(cfg[k] is None for k in ("warmup_frac", "warmup_shape", "div_factor",
                                        "final_div_factor"))
    assert cfg["label_smoothing"] == 0.0 and cfg["ema_decay"] == 0.999 and cfg["tta"] == "flip"


@pytest.mark.parametrize("stack", ["torch_cnn", "jax_port"])
def test_dropout_p_is_recorded_and_built(stack, archive, tmp_path):
    """--dropout-p reaches config.json and each stack's model builder; unset, the network
    keeps the original's 0.5 and the configuration says so with None. (That each stack's
    training honours it is test_parity_cnn's whole-epoch v3 test at dropout_p 0.)"""
    out = tmp_path / "r"
    assert train(stack, archive, out, fresh=("--preset", "v3-recipe", "--batch-size", "8",
                                             "--epochs", "1", "--dropout-p", "0.25")) == (0, None)
    assert json.loads((out / "config.json").read_text())["dropout_p"] == 0.25
    st = {"torch_cnn": lambda: importlib.import_module("torch_cnn.train").TorchCNN(),
          "jax_port": lambda: importlib.import_module("jax_port.train").JaxPort()}[stack]()
    from core.config import configure
    for argv, want in ((["--preset", "v3-recipe", "--dropout-p", "0"], 0.0),
                       (["--preset", "v3-recipe"], None)):
        cfg = configure(st, argv)[0]
        assert cfg["dropout_p"] == want
        if stack == "torch_cnn":
            from torch_cnn.model import init_model
            assert init_model("v3", 0, cfg["dropout_p"]).dropout.p == (0.5 if want is None else want)
        else:
            from jax_port.model import get_spec
            assert get_spec("v3", None, cfg["dropout_p"]).dropout_p == (0.5 if want is None else want)


def test_numpy_mlp_has_no_recipe_flags(archive, tmp_path):
    code, err = train("numpy_mlp", archive, tmp_path / "r",
                      fresh=("--model", "mlp2", "--tta", "flip"))
    assert code == 2 and "unrecognized arguments: --tta" in err


# ------------------------------------------------------------------ recipe runs, both stacks
def _interrupt_second_epoch(monkeypatch, stack):
    """Ctrl-C during the second epoch of the next training (the stack's own epoch call)."""
    if stack == "torch_cnn":
        from torch_cnn import train as TT
        cls = TT.TorchCNN
    else:
        from jax_port import train as JT
        cls = JT.JaxPort
    real, calls = cls.train_epoch, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(cls, "train_epoch", interrupted)


@pytest.mark.parametrize("stack", ["torch_cnn", "jax_port"])
def test_recipe_run_resumes_bit_identical_and_saves_the_average(stack, archive, tmp_path,
                                                                 monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    # with label smoothing too (not in the preset), so that every ingredient is resumed
    fresh = ("--preset", "v3-recipe", "--batch-size", "8", "--epochs", "3",
             "--label-smoothing", "0.1")
    assert train(stack, archive, full, fresh=fresh) == (0, None)
    cfg = json.loads((full / "config.json").read_text())
    given = {"epochs": 3, "batch_size": 8, "label_smoothing": 0.1}
    for k, v in PRESETS["v3-recipe"].items():
        assert cfg[k] == given.get(k, v), k
    hist = json.loads((full / "metrics.json").read_text())["history"]
    sched = StepSchedule.from_config(cfg, steps_per_epoch=3)  # 24 images / 8
    assert [h["lr"] for h in hist] == pytest.approx([sched.lr(3 * e) for e in range(3)])

    with monkeypatch.context() as m:
        _interrupt_second_epoch(m, stack)
        assert train(stack, archive, part, fresh=fresh)[0] == 130
    assert json.loads((part / "state.json").read_text())["epoch_completed"] == 1
    # the schedule spans the epochs the run was started with: --epochs cannot change now
    code, err = train(stack, archive, part, "--resume", "--epochs", "4")
    assert code == 2 and "one-cycle" in err and "--epochs 4" in err
    code, err = train(stack, archive, part, "--resume", "--ema-decay", "0.5")
    assert code == 2 and "--ema-decay cannot be given with it" in err
    assert train(stack, archive, part, "--resume") == (0, None)
    for f in ("model.safetensors", "state.safetensors"):
        assert_same_weights(full / f, part / f)
    assert json.loads((full / "metrics.json").read_text())["final"] == \
        json.loads((part / "metrics.json").read_text())["final"]

    # model.safetensors is the moving average, which the resume state also carries
    state, _ = load_safetensors(full / "state.safetensors")
    model, _ = load_safetensors(full / "model.safetensors")
    for k, v in model.items():
        np.testing.assert_array_equal(state[f"ema.{k}"], v, err_msg=k)
    assert not np.array_equal(state["model.fc1.weight"], model["fc1.weight"])


def test_a_run_folder_of_another_format_is_refused_with_one_line(archive, tmp_path):
    """config.json of another run format (e.g. one from before the recipe's keys): refused
    by --resume and by predict, each with one line that says so; nothing is guessed."""
    out = tmp_path / "old"
    assert train("torch_cnn", archive, out,
                 fresh=("--model", "v3", "--batch-size", "8", "--epochs", "1")) == (0, None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run_format"] == RUN_FORMAT
    for k in [*RECIPE_DEFAULTS, "run_format"]:
        cfg.pop(k)
    (out / "config.json").write_text(json.dumps(cfg))
    code, err = train("torch_cnn", archive, out, "--resume", "--epochs", "2")
    assert code == 2 and "run format 1" in err and f"format {RUN_FORMAT} only" in err
    p = run("torch_cnn.predict", "--run", out, str(archive[0]))
    assert_user_error(p, "run format 1")


def test_predict_applies_the_runs_flip_tta_in_both_stacks(archive, tmp_path):
    """A torch recipe run scored by torch_cnn.predict and jax_port.predict: both average
    the logits of the image and its mirror (config.json's tta), and agree."""
    import torch

    from jax_port.predict import Detector as JaxDetector
    from torch_cnn.model import build_model
    from torch_cnn.checkpoint import load_into
    from torch_cnn.pipeline import to_input
    from torch_cnn.predict import Detector as TorchDetector
    out = tmp_path / "r"
    assert train("torch_cnn", archive, out, fresh=("--preset", "v3-recipe", "--batch-size", "8",
                                                   "--epochs", "1")) == (0, None)
    imgs = np.stack([synthetic_image(i % 2, i) for i in range(6)])
    net = load_into(out / "model.safetensors", build_model("v3")).eval()
    with torch.no_grad():
        z = 0.5 * (net(to_input(torch.from_numpy(imgs))) +
                   net(to_input(torch.from_numpy(imgs[:, :, ::-1].copy())))).double().numpy()
    want = 1 / (1 + np.exp(z))
    for det in (TorchDetector.load(out, "cpu"), JaxDetector.load(out, "cpu")):
        got = np.array([r["p_fake"] for r in det.predict(imgs)])
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "tta": "rotate"}))
    with pytest.raises(UserError, match="unknown test-time augmentation 'tta' 'rotate'"):
        TorchDetector.load(out, "cpu")
    with pytest.raises(UserError, match="unknown test-time augmentation"):
        JaxDetector.load(out, "cpu")


# ------------------------------------------------------------------ bench.studies.recipe
def test_the_ladder_adds_one_ingredient_at_a_time_and_ends_at_the_preset():
    from bench.studies import recipe as R
    rungs = R.rungs()
    ladder, tried = rungs[:len(R.INGREDIENTS) + 2], rungs[len(R.INGREDIENTS) + 2:]
    assert [r for r, _, _ in rungs] == ["reference", "v3-30", "onecycle", "ema", "recipe",
                                        "smoothing"]
    assert ladder[0][2] == PRESETS["v3"]
    assert {**DEFAULTS["cnn"], **ladder[-1][2]} == {**DEFAULTS["cnn"], **PRESETS["v3-recipe"]}
    assert ladder[1][2] == {**PRESETS["v3"], "epochs": PRESETS["v3-recipe"]["epochs"]}
    for (_, _, before), (_, _, after), (_, _, keys) in zip(ladder[1:], ladder[2:], R.INGREDIENTS):
        changed = {k for k in after if before.get(k) != after.get(k)}
        assert changed and changed <= set(keys) and all(k in after for k in keys)
    assert all(r["epochs"] <= 30 for _, _, r in rungs[1:])
    # every recipe key the preset turns on is some rung's ingredient
    on = {k for k in RECIPE_DEFAULTS if PRESETS["v3-recipe"][k] != RECIPE_DEFAULTS[k]}
    assert {k for _, _, keys in R.INGREDIENTS for k in keys} >= set(ONECYCLE_KEYS) | on
    # a tried ingredient is the preset with that one change
    for (_, _, settings), (_, _, change) in zip(tried, R.TRIED):
        assert settings == {**ladder[-1][2], **change} and settings != ladder[-1][2]


def _in_process(cmd, log):
    """bench.studies.launcher.launch, in this process: ``[python, -m, <stack>.train, args...]``."""
    main = importlib.import_module(cmd[2]).main
    try:
        return main(cmd[3:])
    except UserError:
        return 2


def test_recipe_ablation_miniature_end_to_end(archive, tmp_path, monkeypatch, capsys):
    from bench.studies import recipe as R
    from bench.studies import launcher
    monkeypatch.setattr(launcher, "launch", _in_process)
    zip_path, cache = archive
    out = tmp_path / "rec"
    args = ["--backend", "spec", "--data", str(zip_path), "--cache-dir", str(cache), "--out",
            str(out), "--seeds", "0,1", "--epochs-scale", "0.04", "--device", "cpu"]
    assert R.main(args) == 0
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rung"], r["seed"]) for r in rows] == [
        ("reference", "0"), ("v3-30", "0"), ("onecycle", "0"), ("ema", "0"), ("recipe", "0"),
        ("recipe", "1"), ("smoothing", "0")]
    assert [r["epochs"] for r in rows] == ["2"] + ["1"] * 6
    for r in rows:
        assert r["status"] == "complete" and 0 <= float(r["test_acc"]) <= 100
        assert float(r["train_seconds"]) > 0 and r["epoch_to_target"] in ("", "1", "2")
    cfgs = {r["rung"]: json.loads((out / "runs" / f"torch_cnn-{r['rung']}-s0" / "config.json")
                                  .read_text()) for r in rows}
    assert cfgs["v3-30"]["schedule"] == "constant" and cfgs["onecycle"]["schedule"] == "onecycle"
    assert cfgs["onecycle"]["ema_decay"] == 0.0 and cfgs["ema"]["ema_decay"] > 0
    assert cfgs["ema"]["tta"] == "none" and cfgs["recipe"]["tta"] == "flip"
    assert cfgs["recipe"]["preset"] == "v3-recipe" and cfgs["recipe"]["label_smoothing"] == 0.0
    # the ingredient left out: the recipe itself plus label smoothing, nothing else changed
    assert cfgs["smoothing"]["label_smoothing"] == 0.1
    assert {k: v for k, v in cfgs["smoothing"].items() if k not in ("label_smoothing", "preset")} \
        == {k: v for k, v in cfgs["recipe"].items() if k not in ("label_smoothing", "preset")}
    md = (out / "table.md").read_text()
    assert "MINIATURE" in md and "not a result" in md
    assert "goal" not in md.lower() and "met" not in md.split()  # measurements, no verdicts
    doc = json.loads((out / "recipe.json").read_text())
    assert doc["miniature"] and doc["summary"]["test_acc"]["n"] == 2
    assert doc["summary"]["seeds"] == [0, 1]

    # resumable: nothing runs again; an unfinished run is resumed, not restarted
    capsys.readouterr()
    m = out / "runs" / "torch_cnn-ema-s0" / "metrics.json"
    (m).write_text(json.dumps({**json.loads(m.read_text()), "complete": False}))
    assert R.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("done in") == 1 and "torch_cnn-ema-s0] -m torch_cnn.train --resume" in err

    # a run made with other settings is refused before anything runs
    c = out / "runs" / "torch_cnn-smoothing-s0" / "config.json"
    c.write_text(json.dumps({**json.loads(c.read_text()), "label_smoothing": 0.3}))
    with pytest.raises(UserError, match="label_smoothing 0.3"):
        R.main(args)


def test_recipe_time_to_target_is_compared_on_one_kind_of_device_only():
    """Seconds to the original's accuracy as a fraction of the reference's training time;
    a reference on a CPU and the recipe on a GPU would give a meaningless fraction. The
    study states measurements, never a verdict on a goal."""
    from bench.studies import recipe as R

    def rec(rung, seed, device, secs, to_target):
        return {"rung": rung, "seed": seed, "status": "complete", "test_acc": 97.0,
                "test_dedup_acc": 97.0, "train_seconds": secs, "device_label": device,
                "seconds_to_target": to_target}
    same = [rec("reference", 0, "cpu", 3000.0, 2500.0), rec("recipe", 0, "cpu", 1800.0, 1400.0),
            rec("recipe", 1, "cpu", 1800.0, None)]
    s = R.summarise(same)
    assert s["fraction_to_target"] == {"0": pytest.approx(1400 / 3000), "1": None}
    assert "seed 0: 0.47 x; seed 1: never" in R._fraction_line(s)
    assert "goals" not in s
    mixed = [same[0], rec("recipe", 0, "NVIDIA H100", 20.0, 15.0)]
    s = R.summarise(mixed)
    assert s["fraction_to_target"] is None and s["devices"] == ["NVIDIA H100", "cpu"]
    assert "not measured (runs on several devices: NVIDIA H100, cpu)" in R._fraction_line(s)


@pytest.mark.parametrize("seeds", ["", "0,,1", "0,0", "-1", "x"])
def test_recipe_refuses_bad_seeds(seeds, tmp_path):
    from bench.studies import recipe as R
    with pytest.raises(UserError, match="--seed"):
        R.main(["--seeds", seeds, "--out", str(tmp_path / "o")])
