"""NumPy MLP: every backward against finite differences, stable BCE, learning,
determinism, resume, and the train/predict CLIs on tiny generated archives."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.tensors import load_safetensors
from numpy_mlp import checkpoint, layers
from numpy_mlp import model as M
from numpy_mlp import predict as P
from numpy_mlp import train as T
from core.catalog import MLP_MODELS, presets_for
from tests.helpers import make_archive, synthetic_image

TOL = 1e-7  # max relative error of analytic vs centred finite-difference gradients
EPS = 1e-5  # finite-difference step (float64): balances truncation (eps^2) and rounding (1e-16/eps)


def rel_err(a, b) -> float:
    """|a - b| / max(|a| + |b|, tiny) with |.| the Euclidean norm over the whole tensor
    (an element-wise ratio is dominated by rounding noise on near-zero entries)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-30))


def num_grad(f, x: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Centred differences of the scalar f() w.r.t. every entry of x (modified in place)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


# ------------------------------------------------------------------ layer gradients
def test_linear_backward_matches_finite_differences():
    r = np.random.default_rng(0)
    A, W, b = r.normal(size=(12, 5)), r.normal(size=(4, 12)), r.normal(size=(4, 1))
    G = r.normal(size=(4, 5))  # upstream gradient: scalar = sum(G * Z)

    def f():
        return float(np.sum(G * layers.linear_forward(A, W, b)[0]))
    _, cache = layers.linear_forward(A, W, b)
    dA, dW, db = layers.linear_backward(G, cache)
    assert dA.shape == A.shape and dW.shape == W.shape and db.shape == b.shape
    for analytic, x in ((dA, A), (dW, W), (db, b)):
        assert rel_err(analytic, num_grad(f, x)) <= TOL
    assert layers.linear_backward(G, cache, need_dA_prev=False)[0] is None


def test_relu_backward_matches_finite_differences():
    r = np.random.default_rng(1)
    Z = r.normal(size=(6, 7))
    Z[np.abs(Z) < 1e-3] = 0.5  # keep away from the kink, where FD is meaningless
    G = r.normal(size=Z.shape)
    _, cache = layers.relu_forward(Z)
    dZ = layers.relu_backward(G, cache)
    assert rel_err(dZ, num_grad(lambda: float(np.sum(G * layers.relu_forward(Z)[0])), Z)) <= TOL


def test_bce_grad_matches_finite_differences_and_is_mean():
    r = np.random.default_rng(2)
    Z = r.normal(scale=3, size=(1, 9))
    Y = (r.random((1, 9)) < 0.5).astype(np.float64)
    g = layers.bce_grad(Z, Y)
    assert rel_err(g, num_grad(lambda: layers.bce_cost(Z, Y), Z)) <= TOL
    # the mean: the cost of a batch repeated twice is the same, its per-logit grad halves
    Z2, Y2 = np.hstack([Z, Z]), np.hstack([Y, Y])
    assert layers.bce_cost(Z2, Y2) == pytest.approx(layers.bce_cost(Z, Y), rel=1e-12)
    np.testing.assert_allclose(layers.bce_grad(Z2, Y2)[:, :9], g / 2, rtol=1e-12)


def test_bce_cost_matches_naive_formula():
    Z = np.array([[-3.0, -0.1, 0.0, 0.7, 4.0]])
    Y = np.array([[0, 1, 1, 0, 1]], float)
    A = 1 / (1 + np.exp(-Z))
    naive = -np.mean(Y * np.log(A) + (1 - Y) * np.log(1 - A))
    assert layers.bce_cost(Z, Y) == pytest.approx(naive, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stable_bce_and_sigmoid_for_huge_logits(dtype):
    Z = np.array([[1e4, -1e4, 800.0, -800.0, 0.0]], dtype)
    Y = np.array([[1, 0, 0, 1, 1]], dtype)
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
        c = layers.bce_cost(Z, Y)
        g = layers.bce_grad(Z, Y)
        s = layers.sigmoid(Z)
    # right ones cost 0, wrong ones cost |z|, z = 0 costs log 2
    assert c == pytest.approx((0 + 0 + 800 + 800 + np.log(2)) / 5, rel=1e-6)
    assert g.dtype == dtype and s.dtype == dtype
    np.testing.assert_allclose(g, [[0, 0, 1 / 5, -1 / 5, -0.5 / 5]], atol=1e-7)
    np.testing.assert_array_equal(s[0, :2], [1, 0])


# ------------------------------------------------------------------ whole-network gradients
@pytest.mark.parametrize("dims", [[12, 7, 1], [12, 6, 5, 4, 1]])
def test_network_gradients_match_finite_differences(dims):
    r = np.random.default_rng(3)
    X = r.random((dims[0], 8))
    Y = (r.random((1, 8)) < 0.5).astype(np.float64)
    params = M.init_params(dims, seed=4, dtype=np.float64)
    for l in range(1, len(dims)):  # non-zero biases so their gradients are exercised
        params[f"b{l}"] = r.normal(scale=0.1, size=params[f"b{l}"].shape)
    logits, caches = M.forward(X, params)
    grads = M.backward(logits, Y, caches)
    # finite differences are only valid away from ReLU kinks
    assert min(np.abs(c[1]).min() for c in caches if c[1] is not None) > 100 * EPS
    assert set(grads) == {f"d{k}" for k in params}

    def f():
        return M.cost(M.forward(X, params)[0], Y)
    for k, p in params.items():
        assert grads[f"d{k}"].shape == p.shape
        assert rel_err(grads[f"d{k}"], num_grad(f, p)) <= TOL, k


def test_forward_shapes_dtypes_and_update():
    dims = M.layer_dims_for("mlp4")
    assert dims == [3072, 20, 7, 5, 1] and M.layer_dims_for("mlp2") == [3072, 7, 1]
    assert M.layer_dims_for("mlp4", [8, 4, 2]) == [3072, 8, 4, 2, 1]
    for dt in (np.float32, np.float64):
        p = M.init_params(dims, 0, dt)
        assert all(v.dtype == dt for v in p.values())
        assert p["W1"].shape == (20, 3072) and p["b1"].shape == (20, 1)
        assert np.all(p["b2"] == 0)
        assert np.std(p["W1"]) == pytest.approx(np.sqrt(2 / 3072), rel=0.05)  # He init
        imgs = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
        X = M.images_to_X(imgs, dt)
        assert X.shape == (3072, 5) and X.dtype == dt
        np.testing.assert_array_equal(X[:, 2], imgs[2].reshape(-1) / dt(255))  # (H, W, C)
        z, _ = M.forward(X, p)
        assert z.shape == (1, 5) and z.dtype == dt
        g = {f"d{k}": np.ones_like(v) for k, v in p.items()}
        new = M.update(p, g, 0.5)
        np.testing.assert_array_equal(new["W1"], p["W1"] - dt(0.5))
        assert new["W1"].dtype == dt
    assert M.lr_at(0.1, 0.5, 0) == 0.1 and M.lr_at(0.1, 0.5, 2) == pytest.approx(0.05)
    f32 = M.init_params([12, 3, 1], 7, np.float32)
    f64 = M.init_params([12, 3, 1], 7, np.float64)
    np.testing.assert_array_equal(f32["W1"], f64["W1"].astype(np.float32))


def test_bad_model_and_hidden():
    from data.errors import UserError
    for bad in (("mlp3", None), ("mlp2", [7, 7]), ("mlp4", [20, 0, 5])):
        with pytest.raises(UserError):
            M.layer_dims_for(*bad)


# ------------------------------------------------------------------ learning
@pytest.mark.parametrize("batch_size", [None, 4])
def test_learns_tiny_separable_problem(batch_size):
    r = np.random.default_rng(5)
    X = r.random((12, 40))
    w = r.normal(size=12)
    Y = ((w @ (X - 0.5)) > 0).astype(np.float64)[None]
    params = M.init_params([12, 8, 1], 0, np.float64)
    losses = []
    for epoch in range(300):
        order = np.random.default_rng(epoch).permutation(40)
        params, loss, acc = T.train_epoch(params, X, Y, order, batch_size, 0.5)
        losses.append(loss)
    assert losses[-1] < 0.5 * losses[0]
    assert np.mean(np.diff(losses[:50]) < 0) > 0.8 if batch_size is None else True
    pred = M.forward(X, params)[0] > 0
    assert np.mean(pred == (Y > 0.5)) == 1.0


def test_full_batch_cost_decreases_monotonically():
    r = np.random.default_rng(6)
    X = r.random((12, 30))
    Y = (X[0:1] > X[1:2]).astype(np.float64)
    params = M.init_params([12, 6, 5, 4, 1], 1, np.float64)
    costs = []
    for _ in range(100):
        params, loss, _ = T.train_epoch(params, X, Y, None, None, 0.05)
        costs.append(loss)
    assert all(b < a for a, b in zip(costs, costs[1:]))


def test_train_epoch_uint8_equals_precomputed_float():
    imgs = np.random.default_rng(7).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    Y = np.arange(10)[None] % 2
    p0 = M.init_params([3072, 4, 1], 0, np.float32)
    order = np.random.default_rng(0).permutation(10)
    a = T.train_epoch(p0, imgs.reshape(10, -1).T, Y, order, 3, 0.1)
    b = T.train_epoch(p0, M.images_to_X(imgs, np.float32), Y, order, 3, 0.1)
    for k in p0:
        np.testing.assert_array_equal(a[0][k], b[0][k])
    assert a[1:] == b[1:]


# ------------------------------------------------------------------ checkpoint
def test_checkpoint_roundtrip_and_validation(tmp_path):
    from data.errors import UserError
    dims = [3072, 5, 1]
    p = M.init_params(dims, 0, np.float64)
    checkpoint.save(tmp_path / "m.safetensors", p, "mlp2", dims)
    q, meta = checkpoint.load(tmp_path / "m.safetensors")
    assert meta["layer_dims"] == dims and meta["family"] == "mlp" and meta["model"] == "mlp2"
    for k in p:
        np.testing.assert_array_equal(p[k], q[k])
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.safetensors"):
        checkpoint.load(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------ CLI
def run_main(main, argv, capsys):
    """Run an entry point as `python -m` would (through run_cli): (exit code, stdout, stderr)."""
    from data.errors import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv, prog="x")
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture
def archive(tmp_path):
    return make_archive(tmp_path / "tiny.zip", n_train=10, n_test=4)


def base_args(archive, tmp_path, out):
    return ["--data", str(archive), "--cache-dir", str(tmp_path / "cache"), "--out",
            str(tmp_path / out), "--no-progress", "--hidden", "5", "--batch-size", "6",
            "--lr", "0.05"]


def test_cli_one_epoch_writes_run_dir(archive, tmp_path, capsys):
    code, _, err = run_main(T.main, base_args(archive, tmp_path, "r") + ["--epochs", "1"], capsys)
    assert code == 0, err
    run = tmp_path / "r"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["stack"] == "numpy_mlp" and cfg["model"] == "mlp2" and cfg["layer_dims"] == [
        3072, 5, 1] and cfg["batch_size"] == 6 and cfg["seed"] == 0 and cfg["dtype"] == "float32"
    m = json.loads((run / "metrics.json").read_text())
    assert m["complete"] is True and len(m["history"]) == 1
    row = m["history"][0]
    for k in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
              "images_per_s"):
        assert k in row
    assert row["epoch"] == 1 and row["lr"] == 0.05
    for split in ("train", "test", "test_dedup"):
        assert set(m["final"][split]) >= {"accuracy", "loss", "roc_auc", "confusion", "n"}
    assert m["final"]["train"]["n"] == 20 and m["final"]["test"]["n"] == 8
    assert m["final"]["gap_pp"] == pytest.approx(m["final"]["train_acc"] - m["final"]["test_acc"])
    tensors, meta = load_safetensors(run / "model.safetensors",
                                     {"W1": ((5, 3072), "float32"), "b1": ((5, 1), "float32"),
                                      "W2": ((1, 5), "float32"), "b2": ((1, 1), "float32")})
    assert meta["family"] == "mlp" and json.loads(meta["layer_dims"]) == [3072, 5, 1]
    assert json.loads((run / "state.json").read_text())["epoch_completed"] == 1


def test_cli_learns_and_eval_every(archive, tmp_path, capsys):
    args = base_args(archive, tmp_path, "r") + ["--epochs", "30", "--eval-every", "10",
                                                "--model", "mlp4", "--hidden", "8,6,4"]
    code, _, err = run_main(T.main, args, capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert ["test_acc" in h for h in m["history"]] == [(i + 1) % 10 == 0 for i in range(30)]
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    assert m["final"]["train_acc"] == 100.0  # the toy images are separable


def weights(run):
    return load_safetensors(run / "model.safetensors")[0]


def test_same_seed_bit_identical_and_resume_identical(archive, tmp_path, capsys):
    common = base_args(archive, tmp_path, "a") + ["--dtype", "float64", "--decay", "0.3"]
    assert run_main(T.main, common + ["--epochs", "4"], capsys)[0] == 0
    b = base_args(archive, tmp_path, "b") + ["--dtype", "float64", "--decay", "0.3"]
    assert run_main(T.main, b + ["--epochs", "4"], capsys)[0] == 0
    c = base_args(archive, tmp_path, "c") + ["--dtype", "float64", "--decay", "0.3"]
    assert run_main(T.main, c + ["--epochs", "2"], capsys)[0] == 0
    code, _, err = run_main(T.main, ["--out", str(tmp_path / "c"), "--resume", "--epochs", "4",
                                     "--no-progress", "--cache-dir", str(tmp_path / "cache")],
                            capsys)
    assert code == 0, err
    wa, wb, wc = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    for k in wa:
        assert wa[k].dtype == np.float64
        np.testing.assert_array_equal(wa[k], wb[k])
        np.testing.assert_array_equal(wa[k], wc[k])
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mc = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert [h["train_loss"] for h in ma["history"]] == [h["train_loss"] for h in mc["history"]]
    # another seed differs
    d = base_args(archive, tmp_path, "d") + ["--dtype", "float64", "--seed", "1"]
    assert run_main(T.main, d + ["--epochs", "1"], capsys)[0] == 0
    assert not np.array_equal(weights(tmp_path / "d")["W1"], wa["W1"])


@pytest.mark.parametrize("bad, needle", [
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--preset", "nope"], "nope"),
    (["--hidden", "7,x"], "--hidden"),
    (["--hidden", "3,3"], "--hidden"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_cli_bad_flags(archive, tmp_path, capsys, bad, needle):
    code, _, err = run_main(T.main, base_args(archive, tmp_path, "r") + bad, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_cli_missing_data_path_and_overwrite(archive, tmp_path, capsys):
    missing = tmp_path / "nowhere.zip"
    args = base_args(archive, tmp_path, "r")
    args[1] = str(missing)
    code, _, err = run_main(T.main, args + ["--epochs", "1"], capsys)
    assert code == 2 and str(missing) in err and len(err.strip().splitlines()) == 1
    assert run_main(T.main, base_args(archive, tmp_path, "r") + ["--epochs", "1"], capsys)[0] == 0
    code, _, err = run_main(T.main, base_args(archive, tmp_path, "r") + ["--epochs", "1"], capsys)
    assert code == 2 and "--resume" in err


def test_non_finite_loss_stops_with_user_error(archive, tmp_path, capsys):
    args = base_args(archive, tmp_path, "r") + ["--epochs", "5", "--lr", "1e30"]
    code, _, err = run_main(T.main, args, capsys)
    assert code == 2 and "non-finite loss" in err and "epoch" in err and "step" in err


def test_presets_are_complete():
    mlp = presets_for(MLP_MODELS)
    assert set(mlp) == {"mlp2-full", "mlp4-full", "mlp2-mini", "mlp4-mini"}
    for name, p in mlp.items():
        assert p["model"] == name.split("-")[0]
        assert (p["batch_size"] is None) == name.endswith("-full")
        assert p["epochs"] == (7000 if name.endswith("-full") else 100)


# ------------------------------------------------------------------ predict
def test_predict_cli(archive, tmp_path, capsys):
    args = base_args(archive, tmp_path, "r") + ["--epochs", "20"]
    assert run_main(T.main, args, capsys)[0] == 0
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(synthetic_image(1, 3)).save(imgs / "real.png")
    Image.fromarray(synthetic_image(0, 4)).save(imgs / "fake.jpg", quality=95)
    Image.fromarray(synthetic_image(0, 5, size=64)).convert("L").save(imgs / "gray64.png")
    Image.fromarray(synthetic_image(1, 6, size=40)).convert("RGBA").save(imgs / "rgba.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    files = [str(imgs / f) for f in ("real.png", "fake.jpg", "broken.jpg", "gray64.png",
                                     "rgba.png")]
    code, out, err = run_main(P.main, ["--run", str(tmp_path / "r"), *files], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "broken.jpg" in err
    lines = out.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        p = float(line.split("P(FAKE)=")[1].split()[0])
        assert 0 <= p <= 1 and (("FAKE" in line.split()[-1]) == (p >= 0.5) or "resized" in line)
    assert "REAL" in lines[0] and "FAKE" in lines[1]  # the trained toy gets these right
    assert "shrunk from 64x64" in lines[2] and "shrunk from 40x40" in lines[3]
    code, out, err = run_main(P.main, ["--run", str(tmp_path / "r"), "--json", *files], capsys)
    assert code == 1
    res = json.loads(out)
    assert [r["path"] for r in res] == files  # the broken one too, with its error
    assert [r["error"] is not None for r in res] == ["broken" in f for f in files]
    res = [r for r in res if r["error"] is None]
    assert all(0 <= r["p_fake"] <= 1 and r["label"] in ("FAKE", "REAL") for r in res)
    assert res[2]["resized"] is True and res[2]["original_size"] == [64, 64]
    assert res[0]["resized"] is False
    # P(FAKE) agrees with the model's own forward pass
    params, _ = P.load_run(tmp_path / "r")
    z = M.forward(M.images_to_X(synthetic_image(1, 3)[None], np.float64),
                  {k: v.astype(np.float64) for k, v in params.items()})[0][0, 0]
    assert res[0]["p_fake"] == pytest.approx(1 / (1 + np.exp(z)), rel=1e-9)
    code, _, err = run_main(P.main, ["--run", str(tmp_path / "nope"), files[0]], capsys)
    assert code == 2 and "nope" in err


def test_python_m_entry_points(archive, tmp_path):
    """The real `python -m numpy_mlp.train` exit codes (run_cli wiring)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "numpy_mlp.train", "--epochs", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--epochs" in r.stderr


def test_ctrl_c_keeps_last_epoch_and_resume_matches(archive, tmp_path, capsys, monkeypatch):
    args = base_args(archive, tmp_path, "u") + ["--epochs", "4", "--decay", "0.5"]
    assert run_main(T.main, args, capsys)[0] == 0
    real, calls = T.train_epoch, []

    def interrupted_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, "train_epoch", interrupted_on_third)
    args = base_args(archive, tmp_path, "i") + ["--epochs", "4", "--decay", "0.5"]
    code, _, err = run_main(T.main, args, capsys)
    run = tmp_path / "i"
    assert code == 130 and "--resume" in err and str(run) in err
    assert json.loads((run / "state.json").read_text())["epoch_completed"] == 2
    assert json.loads((run / "metrics.json").read_text())["complete"] is False
    monkeypatch.setattr(T, "train_epoch", real)
    code, _, err = run_main(T.main, ["--out", str(run), "--resume", "--no-progress",
                                     "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    wu, wi = weights(tmp_path / "u"), weights(run)
    for k in wu:
        np.testing.assert_array_equal(wu[k], wi[k])
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 4


def test_cli_full_batch_and_resume_flag_checks(archive, tmp_path, capsys):
    args = base_args(archive, tmp_path, "f") + ["--epochs", "2", "--batch-size", "full",
                                                "--preset", "mlp2-full", "--eval-every", "5"]
    code, _, err = run_main(T.main, args, capsys)
    assert code == 0, err
    run = tmp_path / "f"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["batch_size"] is None and cfg["preset"] == "mlp2-full" and cfg["epochs"] == 2
    assert cfg["lr"] == 0.05  # explicit flag beats the preset
    hist = json.loads((run / "metrics.json").read_text())["history"]
    assert "test_acc" not in hist[0] and "test_acc" in hist[1]  # last epoch always evaluated
    resume = ["--out", str(run), "--resume", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    code, _, err = run_main(T.main, resume + ["--lr", "0.5"], capsys)
    assert code == 2 and "--lr" in err
    code, _, err = run_main(T.main, resume + ["--epochs", "1"], capsys)
    assert code == 2 and "already completed 2 epochs" in err
    code, _, err = run_main(T.main, ["--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "no run to resume" in err
