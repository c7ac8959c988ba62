"""Parity of the JAX MLP with the NumPy specification (numpy_mlp), micrograd-style:
the same computation in two engines, values AND gradients compared, in float64.

Tolerances (float64, unit roundoff 1.1e-16; a 3072-term dot product accumulates
~1e-14 relative error in the worst case, typically far less):
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.batching import epoch_order
from jax_port import convert
from jax_port import model as JM
from jax_port import steps as S
from jax_port.steps import init_state
from tests.jax_helpers import runner
from numpy_mlp import model as NM
from numpy_mlp.train import train_epoch
from tests.helpers import assert_close_tree

# forward logits and cost: the two engines sum the same products in different orders
# (BLAS W @ X vs XLA x @ W.T); float64 rounding differences stay ~1e-15.
FORWARD_RTOL = 1e-12
# gradients: one more matmul and the sigmoid; still pure float64 rounding.
GRAD_RTOL = 1e-10
# weights after 50 gradient-descent steps with lr decay: rounding differences are
# carried along but (lr ~0.1, smooth loss) not amplified beyond ~1e-13.
TRAIN_RTOL = 1e-9

SEED = 3


@pytest.fixture
def x64():
    """float64 in JAX for this test only (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def _batch(m=16, seed=0):
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (m, 32, 32, 3), dtype=np.uint8)
    labels = g.integers(0, 2, m).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("name", ["mlp2", "mlp4"])
def test_forward_cost_and_gradients_match_numpy(x64, name):
    dims = NM.layer_dims_for(name)
    params = NM.init_params(dims, SEED, np.float64)
    images, labels = _batch()
    X, Y = NM.images_to_X(images, np.float64), labels.reshape(1, -1).astype(np.float64)
    logits_np, caches = NM.forward(X, params)
    cost_np = NM.cost(logits_np, Y)
    grads_np = NM.backward(logits_np, Y, caches)

    spec = JM.get_spec(name)
    v = jax.tree_util.tree_map(jnp.asarray, convert.mlp_from_canonical(params))
    assert v["params"]["dense1"]["kernel"].dtype == jnp.float64
    x = jnp.asarray(images, jnp.float64) / 255.0

    def loss(p):
        z, _ = JM.apply(spec, {"params": p}, x, train=True)
        return JM.bce_with_logits(z, jnp.asarray(labels)), z

    (cost_j, logits_j), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    assert_close_tree({"logits": np.asarray(logits_j)}, {"logits": logits_np[0]}, FORWARD_RTOL,
                      f"{name} forward")
    assert abs(float(cost_j) - cost_np) <= FORWARD_RTOL * abs(cost_np), (float(cost_j), cost_np)
    g_canon = {f"d{k}": a for k, a in convert.mlp_to_canonical({"params": g}).items()}
    assert_close_tree(g_canon, grads_np, GRAD_RTOL, f"{name} gradients")


def test_mlp_conversion_round_trip_is_exact():
    for dtype in (np.float32, np.float64):
        params = NM.init_params(NM.layer_dims_for("mlp4"), SEED, dtype)
        params["b2"] = np.random.default_rng(0).standard_normal((7, 1)).astype(dtype)
        back = convert.mlp_to_canonical(convert.mlp_from_canonical(params))
        assert list(back) == list(params)
        for k in params:
            assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k


def test_50_full_batch_gd_steps_with_decay_match_numpy(x64):
    """50 epochs of full-batch gradient descent, lr = 0.1 / (1 + 0.05 epoch)."""
    lr0, decay, epochs = 0.1, 0.05, 50
    dims = NM.layer_dims_for("mlp4")
    params = NM.init_params(dims, SEED, np.float64)
    images, labels = _batch(24, seed=1)
    X, Y = NM.images_to_X(images, np.float64), labels.reshape(1, -1)

    cfg, tr = runner(JM.get_spec("mlp4"), lr=lr0, batch_size=None, decay=decay, seed=SEED,
                 dtype=jnp.float64)
    state = init_state(cfg, convert.mlp_from_canonical(params))
    xd, yd = jnp.asarray(images), jnp.asarray(labels)
    for e in range(epochs):
        params, loss_np, acc_np = train_epoch(params, X, Y, None, None, NM.lr_at(lr0, decay, e))
        state, row = tr.run_epoch(state, xd, yd, e)
        assert row["lr"] == NM.lr_at(lr0, decay, e)
        assert abs(row["train_loss"] - loss_np) <= 1e-10 * abs(loss_np)
        assert row["train_acc"] == acc_np
    err = assert_close_tree(convert.mlp_to_canonical(state.variables), params, TRAIN_RTOL,
                            "mlp4 after 50 GD steps")
    assert err < TRAIN_RTOL


def test_minibatch_epochs_visit_the_same_batches_as_numpy(x64):
    """The compiled epoch (lax.scan over full batches + a step for the partial one)
    follows numpy_mlp's train_epoch: same order, same batches, same decayed lr."""
    lr0, decay, bs, seed = 0.05, 0.1, 16, 5
    params = NM.init_params(NM.layer_dims_for("mlp2"), seed, np.float64)
    images, labels = _batch(40, seed=2)  # 2 full batches + a partial one of 8
    U, Y = images.reshape(40, -1).T, labels.reshape(1, -1)
    cfg, tr = runner(JM.get_spec("mlp2"), lr=lr0, batch_size=bs, decay=decay, seed=seed,
                 dtype=jnp.float64, chunk_batches=1)  # chunk 1: also exercises chunking
    state = init_state(cfg, convert.mlp_from_canonical(params))
    xd, yd = jnp.asarray(images), jnp.asarray(labels)
    for e in range(4):
        params, loss_np, acc_np = train_epoch(params, U, Y, epoch_order(seed, e, 40), bs,
                                              NM.lr_at(lr0, decay, e))
        state, row = tr.run_epoch(state, xd, yd, e)
        assert abs(row["train_loss"] - loss_np) <= 1e-10 * abs(loss_np)
        assert row["train_acc"] == acc_np
    assert_close_tree(convert.mlp_to_canonical(state.variables), params, TRAIN_RTOL,
                      "mlp2 after 4 mini-batch epochs")


@pytest.mark.parametrize("name", ["mlp2", "mlp4"])
def test_feature_major_full_batch_step_is_the_batch_major_step(x64, name):
    """Full-batch training runs the MLP feature-major (numpy_mlp's orientation, faster on
    XLA:CPU); one step of it gives the loss, count and weights of the batch-major step."""
    spec = JM.get_spec(name)
    params = NM.init_params(NM.layer_dims_for(name), SEED, np.float64)
    images, labels = _batch(24, seed=4)
    cfg, tr = runner(spec, lr=0.1, batch_size=None, seed=SEED, dtype=jnp.float64)
    state = init_state(cfg, convert.mlp_from_canonical(params))
    xd, yd = jnp.asarray(images), jnp.asarray(labels)
    xt = tr.full_batch_inputs(xd)
    assert xt.shape == (3072, 24) and tr.full_batch_inputs(xd) is xt  # made once per split
    # exactly the pixels the batch-major step feeds its first layer (XLA's compiled / 255 may
    # differ from NumPy's by an ulp, which the tolerances below cover)
    batch_major = jax.jit(lambda x: S.inputs(cfg, x))(xd)
    np.testing.assert_array_equal(np.asarray(xt), np.asarray(batch_major).reshape(24, -1).T)
    lr = jnp.asarray(0.1, jnp.float64)
    fm, (l_fm, nc_fm) = S.full_batch_step(cfg, state, xt, yd, lr)
    bm, (l_bm, nc_bm) = tr.step(state, images, labels, lr=0.1)
    assert int(nc_fm) == int(nc_bm)
    assert abs(float(l_fm) - float(l_bm)) <= FORWARD_RTOL * abs(float(l_bm))
    assert_close_tree(convert.mlp_to_canonical(fm.variables),
                      convert.mlp_to_canonical(bm.variables), GRAD_RTOL,
                      f"{name} feature-major step")
    other = jnp.asarray(images[::-1].copy())
    assert tr.full_batch_inputs(other) is not xt  # a new training split gets its own copy
