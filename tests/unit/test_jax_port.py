"""jax_port on its own: model layouts, device augmentation, BatchNorm/dropout semantics, init,
checkpoints, and the train/predict entry points (tiny synthetic archives, fast)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data.batching import augment, augment_draws
from core.tensors import load_safetensors
from jax_port import checkpoint, convert
from jax_port import model as M
from jax_port import predict as P
from jax_port import train as T
from jax_port import steps as S
from jax_port.steps import StepConfig, augment_device, init_state
from tests.jax_helpers import runner
from tests.helpers import make_archive, synthetic_image


def run_main(main, argv, capsys):
    from data.errors import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture
def archive(tmp_path):
    return make_archive(tmp_path / "tiny.zip", n_train=6, n_test=3)


def base(archive, tmp_path, out, *more):
    return ["--data", str(archive), "--cache-dir", str(tmp_path / "cache"), "--out",
            str(tmp_path / out), "--no-progress", "--seed", "1", *more]


def weights(run):
    return load_safetensors(run / "model.safetensors")[0]


# ------------------------------------------------------------------ model names
def test_mlp_layouts_equal_the_spec():
    import numpy_mlp.model as NM
    for name, h in M.MLP_HIDDEN.items():
        assert list(M.layer_dims_for(name)) == NM.layer_dims_for(name)


# ------------------------------------------------------------------ layers
def test_device_augmentation_is_bit_identical_to_the_numpy_reference():
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    d = augment_draws(5, 2, 64)
    assert d.flip.any() and (~d.flip).any() and d.dy.min() == 0 and d.dy.max() == 8
    got = np.asarray(jax.jit(augment_device)(jnp.asarray(images), d.dy, d.dx, d.flip))
    assert got.dtype == np.uint8 and np.array_equal(got, augment(images, d))


def test_batchnorm_is_torch_batchnorm2d():
    """Batch statistics (biased variance) normalise; running stats move by momentum 0.1
    towards the batch mean and the UNBIASED variance; eval uses the running stats."""
    g = np.random.default_rng(1)
    x = g.standard_normal((4, 5, 5, 3)).astype(np.float32) * 3 + 1
    p = {"scale": np.array([1.0, 2.0, 0.5], np.float32), "bias": np.array([0.0, 1.0, -1.0], np.float32)}
    s = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32),
         "num_batches_tracked": np.int32(0)}
    y, new = M.batchnorm(jnp.asarray(x), p, s, train=True)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    n = 4 * 5 * 5
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    assert int(new["num_batches_tracked"]) == 1
    y_eval, same = M.batchnorm(jnp.asarray(x), p, new, train=False)
    np.testing.assert_allclose(y_eval, (x - new["mean"]) / np.sqrt(new["var"] + 1e-5) * p["scale"]
                               + p["bias"], rtol=1e-5, atol=1e-5)
    assert same is new


def test_dropout_uses_the_given_mask_with_inverted_scaling_and_is_off_in_eval():
    spec = M.get_spec("dropout")
    v = M.init_variables(spec, 0)
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)), jnp.float32)
    keep = jnp.ones((2, 512), bool)
    fwd = jax.jit(lambda v, x, mask: M.apply(spec, v, x, train=True, mask=mask)[0])
    z_keep = fwd(v, x, keep)
    z_eval = jax.jit(lambda v, x: M.apply(spec, v, x, train=False)[0])(v, x)
    # all kept: fc2 sees 2 * h, so the logit minus its bias doubles
    b = v["params"]["fc2"]["bias"][0]
    np.testing.assert_allclose(z_keep - b, 2 * (z_eval - b), rtol=1e-5)
    z_none = fwd(v, x, jnp.zeros((2, 512), bool))
    np.testing.assert_allclose(z_none, jnp.full(2, b), rtol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        M.apply(spec, v, x, train=True)


def test_inits_follow_the_specs_distributions():
    v = M.init_variables(M.get_spec("v3"), 0)
    p = v["params"]
    for name, fan_in in (("conv1", 27), ("conv2", 288), ("fc1", 4096), ("fc2", 512)):
        for t in ("kernel", "bias"):
            a = np.asarray(p[name][t])
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(a).max() <= bound, (name, t)
            if a.size >= 32:  # enough draws to come near the bound of U(-bound, bound)
                assert np.abs(a).max() > 0.8 * bound and abs(a.std() * np.sqrt(3) / bound - 1) < 0.3
    assert np.all(np.asarray(v["batch_stats"]["bn2"]["var"]) == 1)
    k = np.asarray(M.init_variables(M.get_spec("mlp4"), 0)["params"]["dense1"]["kernel"])
    assert k.shape == (3072, 20) and abs(k.std() / np.sqrt(2 / 3072) - 1) < 0.05
    # a different seed, different weights; the same seed, the same weights
    k2 = np.asarray(M.init_variables(M.get_spec("mlp4"), 1)["params"]["dense1"]["kernel"])
    k0 = np.asarray(M.init_variables(M.get_spec("mlp4"), 0)["params"]["dense1"]["kernel"])
    assert not np.array_equal(k, k2) and np.array_equal(k, k0)


def test_bce_gradient_is_sigmoid_minus_label_even_at_zero_logit():
    z = jnp.array([0.0, 0.0, 3.0, -50.0, 80.0])
    y = jnp.array([1, 0, 1, 1, 0])
    g = jax.grad(lambda z: M.bce_with_logits(z, y))(z)
    np.testing.assert_allclose(g, (jax.nn.sigmoid(z) - y) / 5, rtol=1e-6, atol=1e-12)
    assert np.isfinite(float(M.bce_with_logits(z, y)))


def test_flax_wrapper_is_the_same_function_and_layout():
    spec = M.get_spec("v3")
    mod = M.FlaxModel(spec)
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)), jnp.float32)
    v = mod.init(jax.random.PRNGKey(0), x)
    ref = M.init_variables(spec, 0)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(ref)
    assert jax.tree_util.tree_map(jnp.shape, v) == jax.tree_util.tree_map(jnp.shape, ref)
    mask = jnp.ones((2, 512), bool)
    z, upd = jax.jit(lambda v, x: mod.apply(v, x, train=True, mask=mask,
                                            mutable=["batch_stats"]))(v, x)
    z_ref, stats = jax.jit(lambda v, x: M.apply(spec, v, x, train=True, mask=mask))(v, x)
    np.testing.assert_array_equal(z, z_ref)
    jax.tree_util.tree_map(np.testing.assert_array_equal, upd["batch_stats"], stats)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["mlp4", "v3"])
def test_checkpoint_save_load_round_trip(tmp_path, name):
    spec = M.get_spec(name)
    v = M.init_variables(spec, 3)
    checkpoint.save(tmp_path / "m.safetensors", spec, v)
    tensors, meta = load_safetensors(tmp_path / "m.safetensors")
    assert meta["family"] == spec.family and meta["model"] == name
    if name == "v3":
        assert tensors["fc1.weight"].shape == (512, 4096) and \
            tensors["bn1.num_batches_tracked"].dtype == np.int64
    else:
        assert tensors["W1"].shape == (20, 3072) and json.loads(meta["layer_dims"]) == [3072, 20, 7, 5, 1]
    spec2, v2, _ = checkpoint.load(tmp_path / "m.safetensors", name)
    assert spec2 == spec
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), v, v2)
    from data.errors import UserError
    with pytest.raises(UserError, match="not 'baseline'"):
        checkpoint.load(tmp_path / "m.safetensors", "baseline")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="bad.safetensors"):
        checkpoint.load(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------ CLI
def test_mlp_cli_run_dir_resume_bit_identical_and_numpy_reads_it(archive, tmp_path, capsys,
                                                                 monkeypatch):
    args = ["--model", "mlp2", "--batch-size", "4", "--lr", "0.05", "--decay", "0.5"]
    code, _, err = run_main(T.main, base(archive, tmp_path, "u", *args, "--epochs", "3"), capsys)
    assert code == 0, err
    run = tmp_path / "u"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["stack"] == "jax_port" and cfg["model"] == "mlp2" and cfg["layer_dims"] == [3072, 7, 1]
    met = json.loads((run / "metrics.json").read_text())
    assert met["complete"] and [h["epoch"] for h in met["history"]] == [1, 2, 3]
    assert met["history"][1]["lr"] == pytest.approx(0.05 / 1.5)
    for k in ("train", "test", "test_dedup"):
        assert met["final"][k]["n"] > 0
    assert met["final"]["gap_pp"] == pytest.approx(met["final"]["train_acc"] - met["final"]["test_acc"])
    # interrupted after 1 epoch, then resumed to 3: bit-identical weights
    code, _, err = run_main(T.main, base(archive, tmp_path, "r", *args, "--epochs", "1"), capsys)
    assert code == 0, err
    # resumed without --cache-dir: it reuses the run's cache, not the default location
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    code, _, err = run_main(T.main, ["--out", str(tmp_path / "r"), "--resume", "--epochs", "3",
                                     "--no-progress"], capsys)
    assert code == 0, err
    assert not (tmp_path / "xdg").exists()
    wu, wr = weights(run), weights(tmp_path / "r")
    for k in wu:
        np.testing.assert_array_equal(wu[k], wr[k])
    # the spec stack evaluates the port's checkpoint to the same logits
    from numpy_mlp import checkpoint as NC
    from numpy_mlp.model import images_to_X, predict_logits
    params, _ = NC.load(run / "model.safetensors")
    imgs = np.stack([synthetic_image(i % 2, i) for i in range(6)])
    spec, v, _ = checkpoint.load(run / "model.safetensors")
    z_j = S.logits(StepConfig.of(spec), v, imgs)
    np.testing.assert_allclose(z_j, predict_logits(images_to_X(imgs), params), rtol=1e-5, atol=1e-5)


def test_cnn_cli_resume_bit_identical_and_predict(archive, tmp_path, capsys):
    """v3: Adam state, BN statistics, augmentation and dropout all survive --resume."""
    args = ["--model", "v3", "--batch-size", "4"]
    code, _, err = run_main(T.main, base(archive, tmp_path, "u", *args, "--epochs", "2"), capsys)
    assert code == 0, err
    code, _, err = run_main(T.main, base(archive, tmp_path, "r", *args, "--epochs", "1"), capsys)
    assert code == 0, err
    st, meta = load_safetensors(tmp_path / "r" / "state.safetensors")
    assert meta["epoch_completed"] == "1" and "adam.exp_avg_sq.fc1.weight" in st
    assert st["model.bn1.num_batches_tracked"] == 3  # 12 images / 4 per batch
    code, _, err = run_main(T.main, ["--out", str(tmp_path / "r"), "--resume", "--epochs", "2",
                                     "--no-progress", "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    wu, wr = weights(tmp_path / "u"), weights(tmp_path / "r")
    assert set(wu) == set(convert.cnn_to_canonical(M.init_variables(M.get_spec("v3"), 0)))
    for k in wu:
        np.testing.assert_array_equal(wu[k], wr[k], err_msg=k)

    # torch_cnn loads the port's checkpoint and computes the same eval logits
    import torch
    from torch_cnn.checkpoint import load_into
    from torch_cnn.model import build_model
    from torch_cnn.pipeline import to_input
    imgs = np.stack([synthetic_image(i % 2, i) for i in range(4)])
    tm = load_into(tmp_path / "u" / "model.safetensors", build_model("v3")).eval()
    with torch.no_grad():
        z_t = tm(to_input(torch.from_numpy(imgs))).numpy()
    spec, v, _ = checkpoint.load(tmp_path / "u" / "model.safetensors")
    np.testing.assert_allclose(S.logits(StepConfig.of(spec), v, imgs), z_t,
                               atol=1e-5)

    # predict: a 32x32 image, a resized one, and a broken file
    Image.fromarray(synthetic_image(1, 3)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"not an image")
    imgs = [str(tmp_path / f) for f in ("a.png", "b.png", "c.png")]
    code, out, err = run_main(P.main, ["--run", str(tmp_path / "u"), *imgs, "--json"], capsys)
    assert code == 1 and "c.png" in err
    res = json.loads(out)
    assert [r["path"] for r in res] == imgs and "c.png" in res[2]["error"]
    res = res[:2]
    assert res[1]["resized"] and res[1]["original_size"] == [64, 48] and not res[0]["resized"]
    assert all(0 <= r["p_fake"] <= 1 and r["label"] == ("FAKE" if r["p_fake"] >= 0.5 else "REAL")
               for r in res)
    code, out, _ = run_main(P.main, ["--run", str(tmp_path / "u"), imgs[1]], capsys)
    assert code == 0 and "P(FAKE)=" in out and "shrunk from 64x48" in out


@pytest.mark.parametrize("argv, needle", [
    (["--model", "v3", "--decay", "0.1"], "--decay applies to the MLP"),
    (["--model", "baseline", "--dtype", "float64"], "float64 applies to the MLP"),
    (["--model", "mlp4", "--hidden", "7"], "mlp4 has 3 hidden"),
    (["--model", "resnet"], "invalid choice"),
    (["--preset", "v3", "--model", "mlp2"], "contradicts"),
    (["--model", "mlp2", "--lr", "-1"], "--lr"),
    ([], "give --model"),
    (["--model", "baseline", "--devices", "0"], "--devices must be a positive integer"),
    (["--model", "baseline", "--devices", "4096"], "--devices 4096: JAX sees"),
    (["--model", "mlp2", "--conv-impl", "im2col"], "--conv-impl im2col applies to the CNN"),
])
def test_bad_flags_give_one_line_errors(archive, tmp_path, capsys, argv, needle):
    code, _, err = run_main(T.main, base(archive, tmp_path, "x", *argv), capsys)
    assert code == 2 and needle in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_data_and_non_finite_loss(archive, tmp_path, capsys):
    code, _, err = run_main(T.main, ["--model", "mlp2", "--data", str(tmp_path / "nope.zip"),
                                     "--out", str(tmp_path / "n"), "--no-progress"], capsys)
    assert code == 2 and "nope.zip" in err
    code, _, err = run_main(T.main, base(archive, tmp_path, "nan", "--model", "mlp2",
                                         "--batch-size", "4", "--lr", "1e38", "--epochs", "3"), capsys)
    assert code == 2 and "non-finite" in err and "epoch 1, step" in err
    assert not (tmp_path / "nan" / "model.safetensors").exists()  # no epoch completed


def test_ctrl_c_keeps_the_last_epoch(archive, tmp_path, capsys, monkeypatch):
    from jax_port import steps
    real, calls = steps.EpochRunner.run_epoch, []

    def interrupted_on_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(steps.EpochRunner, "run_epoch", interrupted_on_second)
    code, _, err = run_main(T.main, base(archive, tmp_path, "i", "--model", "mlp2",
                                         "--epochs", "3"), capsys)
    assert code == 130 and f"--out {tmp_path / 'i'} --resume" in err
    assert json.loads((tmp_path / "i" / "state.json").read_text())["epoch_completed"] == 1


def test_ctrl_c_during_the_compilation_says_how_to_resume(archive, tmp_path, capsys,
                                                          monkeypatch):
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(T.JaxPort, "compile", interrupted)
    code, _, err = run_main(T.main, base(archive, tmp_path, "k", "--model", "mlp2",
                                         "--epochs", "2"), capsys)
    assert code == 130 and f"--out {tmp_path / 'k'} --resume" in err


@pytest.mark.parametrize("name,batch_size,augment", [("dropout", 5, False), ("v3", 5, True),
                                                     ("mlp2", 5, False), ("mlp2", None, False)])
def test_compile_epoch_leaves_nothing_to_compile_and_changes_nothing(name, batch_size, augment):
    """``compile_epoch`` compiles every program an epoch dispatches (several chunks and the
    partial batch here), so the epoch itself compiles nothing; and the epoch trains exactly
    what it trains without it. Shapes unique to this test (13 images, batches of 5)."""
    spec = M.get_spec(name)
    imgs = jnp.asarray(np.stack([synthetic_image(i % 2, i) for i in range(13)]))
    labels = jnp.asarray(np.arange(13) % 2, dtype=jnp.float32)
    events = []

    def listen(event, _d, **_k):
        events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        _compile_then_run(spec, batch_size, augment, imgs, labels, events)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _compile_then_run(spec, batch_size, augment, imgs, labels, events):

    def fresh():
        cfg, tr = runner(spec, lr=1e-3, batch_size=batch_size, augment=augment, seed=3,
                         chunk_batches=1)
        return tr, init_state(cfg, M.init_variables(spec, 3))

    def compiles():
        return sum(e == "/jax/core/compile/backend_compile_duration" for e in events)
    tr, state = fresh()
    before = compiles()
    tr.compile_epoch(state, imgs, labels, 0)
    assert compiles() > before  # it compiled something (a no-op would fail below instead)
    before = compiles()
    state, row = tr.run_epoch(state, imgs, labels, 0)
    jax.block_until_ready(state)
    assert compiles() == before, "run_epoch compiled after compile_epoch"
    tr2, state2 = fresh()
    state2, row2 = tr2.run_epoch(state2, imgs, labels, 0)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert row["train_loss"] == row2["train_loss"]


def test_driver_reports_compilation_apart_and_sums_it_over_a_resume(archive, tmp_path, capsys):
    args = ["--model", "baseline", "--batch-size", "4"]
    code, _, err = run_main(T.main, base(archive, tmp_path, "c", *args, "--epochs", "1"), capsys)
    assert code == 0, err
    first = json.loads((tmp_path / "c" / "metrics.json").read_text())["compile_seconds"]
    assert first > 0
    code, _, err = run_main(T.main, ["--out", str(tmp_path / "c"), "--resume", "--epochs", "2",
                                     "--no-progress", "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["compile_seconds"] > first
    # metrics.json without it is not a file this version wrote: refused, not guessed
    m = tmp_path / "c" / "metrics.json"
    doc = json.loads(m.read_text())
    del doc["compile_seconds"]
    m.write_text(json.dumps(doc))
    code, _, err = run_main(T.main, ["--out", str(tmp_path / "c"), "--resume", "--epochs", "3",
                                     "--no-progress", "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and "'compile_seconds' missing" in err
