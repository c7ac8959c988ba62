"""Parity of the JAX CNNs with the PyTorch specification (torch_cnn), micrograd-style:
the same weights (converted from torch) and batches in both engines, values AND
gradients compared, then whole Adam trajectories; float32 throughout.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch.nn import functional as F

from data.batching import augment_draws, dropout_rng, epoch_order, identity_draws
from core.recipe import StepSchedule, smooth_targets
from jax_port import convert
from jax_port import model as JM
from bench.speed.parity import FixedMaskDropout
from jax_port import steps as S
from jax_port.steps import ADAM_B1, ADAM_B2, ADAM_EPS, StepConfig, init_state, loss_fn
from tests.jax_helpers import runner
from tests.helpers import assert_close_tree
from torch_cnn.checkpoint import state_to_numpy
from torch_cnn.model import DROPOUT_P, FlipAverage, init_model
from torch_cnn.pipeline import DevicePipeline, augment_torch, to_input
from torch_cnn.train import (ema_pairs, ema_update, evaluate, make_optimizer, new_ema_model,
                             set_lr, train_step)

# eval-mode logits, absolute: float32 has ~6e-8 relative precision; a logit sums ~4e4
# products of O(1e-2) terms through 4 layers, and the engines order the sums differently
# (im2col matmul vs torch's conv kernels), so ~1e-6 is typical; 1e-5 leaves a margin.
EVAL_ATOL = 1e-5
# gradients, relative to each tensor's max |value| (entry-wise relative error is
# meaningless for entries near zero): float32 rounding through backprop, ~1e-6 typical.
GRAD_RTOL = 1e-4
# weights and BN statistics after ADAM_STEPS Adam steps in float64, relative to each
# tensor's max |value|: rounding differences ~1e-16 are far below Adam's eps (1e-8), so
# nothing amplifies them much; measured 2.6e-9 (v3, conv1.bias: a zero true gradient under
# BN, so Adam steps on rounding noise even here), everything else far smaller.
TRAIN64_RTOL = 1e-8
# the same in float32, per tensor, relative Frobenius norm ||jax - torch|| / ||torch||
# (see test_adam_trajectory_matches_torch_in_float32 for why not max-abs), per model: the
# worst tensor measured over the plain and the recipe trajectories on the noise batches
# used here is 2.2e-2 (baseline fc1.weight: it memorises noise, and rounding differences
# grow chaotically), 5.4e-3 (dropout fc1.bias), 6.3e-3 (v3 bn1.bias, recipe). Adam's beta2
# at 0.99 instead of 0.999 gives 4.9e-2 / 3.5e-2 / 1.9e-2, so these bounds catch a bug of
# that size; the float64 trajectories (TRAIN64_RTOL) are the finer guard.
TRAIN32_FRO = {"baseline": 4e-2, "dropout": 1.5e-2, "v3": 1.5e-2}
# the compiled epoch (baseline, 3 steps) against torch's DevicePipeline, relative to each
# tensor's max |value|: 3 steps leave no time for the drift described above.
EPOCH_RTOL = 1e-3
# two compiled recipe epochs (6 steps) of each stack against the other, per tensor, relative
# Frobenius norm: measured up to 2.7e-5 (conv2.weight, live weights)
RECIPE_EPOCH_FRO = 1e-3
ADAM_STEPS = 20
ADAM_STEPS_64 = 10  # float64 torch convolutions are slow on CPU; 10 steps already show it
BATCH = 8
LR = 1e-3
SEED = 7
MODELS = ("baseline", "dropout", "v3")
CPU_CONV_IMPLS = ("im2col", "hybrid")  # the formulations the port trains with on a CPU


def _torch_model(name, random_bn=False):
    """The spec's model for SEED, dropout with a mask we set. ``random_bn``: BatchNorm's scale,
    shift and running statistics drawn away from their initial 1 / 0 / 0 / 1, at which
    eval-mode BN is the identity (to 5e-6) and the scale drops out of every gradient: a port
    that skipped BN in eval, or forgot the scale in its backward, would pass there."""
    m = init_model(name, SEED)
    if m.dropout is not None:
        m.dropout = FixedMaskDropout(DROPOUT_P)
    if random_bn and m.use_bn:
        g = np.random.default_rng(1)
        with torch.no_grad():
            for bn in (m.bn1, m.bn2):
                c = bn.num_features
                bn.running_mean.copy_(torch.from_numpy(g.normal(0, 0.3, c).astype(np.float32)))
                bn.running_var.copy_(torch.from_numpy(g.uniform(0.2, 3, c).astype(np.float32)))
                bn.weight.copy_(torch.from_numpy(g.uniform(0.5, 1.5, c).astype(np.float32)))
                bn.bias.copy_(torch.from_numpy(g.normal(0, 0.2, c).astype(np.float32)))
    return m


def _data(n=64, seed=0):
    g = np.random.default_rng(seed)
    return (g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            g.integers(0, 2, n).astype(np.uint8))


def _mask(step, b=BATCH, p=DROPOUT_P):
    return dropout_rng(SEED, step).random((b, 512)) < 1.0 - p


def _torch_grads(model):
    return {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c_in, c_out, hw", [(3, 32, 32), (32, 64, 16), (5, 7, 6)])
@pytest.mark.parametrize("conv_impl", JM.CONV_IMPLS)
def test_conv3x3_values_and_gradients_match_torch_conv2d(conv_impl, c_in, c_out, hw, dtype):
    """Each convolution formulation (hybrid: hand-written backward; im2col, xla: autodiff)
    against torch's Conv2d(3, padding=1) alone: output, input gradient and kernel/bias
    gradients under a random output cotangent, at both CNN layers' shapes (C_in 3 takes
    the hybrid's im2col forward, 32 its lax.conv forward) and an odd one."""
    g = np.random.default_rng(c_in)
    x = g.standard_normal((3, hw, hw, c_in)).astype(dtype)
    k = (g.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(dtype)
    bias = g.standard_normal(c_out).astype(dtype)
    gy = g.standard_normal((3, hw, hw, c_out)).astype(dtype)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    kt = torch.from_numpy(k).permute(3, 2, 0, 1).requires_grad_()   # HWIO -> OIHW
    bt = torch.from_numpy(bias).requires_grad_()
    yt = F.conv2d(xt, kt, bt, padding=1)
    yt.backward(torch.from_numpy(gy).permute(0, 3, 1, 2))
    with jax.enable_x64(dtype == np.float64):
        y, vjp = jax.vjp(lambda a, w, b: JM.conv3x3(a, w, b, conv_impl),
                         jnp.asarray(x), jnp.asarray(k), jnp.asarray(bias))
        dx, dk, db = (np.asarray(t) for t in vjp(jnp.asarray(gy)))
        y = np.asarray(y)
    assert y.dtype == dx.dtype == dk.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert_close_tree({"y": y, "dx": dx, "dk": dk, "db": db},
                      {"y": yt.detach().permute(0, 2, 3, 1).numpy(),
                       "dx": xt.grad.permute(0, 2, 3, 1).numpy(),
                       "dk": kt.grad.permute(2, 3, 1, 0).numpy(), "db": bt.grad.numpy()},
                      tol, f"conv3x3 {conv_impl} {c_in}->{c_out} {np.dtype(dtype).name}")


def test_relu_maxpool_matches_torch_including_ties():
    """relu_maxpool2 (pool-then-ReLU with a hand-written backward) against torch's
    max_pool2d(relu(x), 2): values, and gradients that go to the FIRST maximum of a window
    (torch's rule) -- checked on windows with 2- and 4-way ties, all-negative and all-zero
    windows, where other tie rules (JAX's autodiff splits the gradient between ties)
    give different gradients."""
    g = np.random.default_rng(0)
    x = g.standard_normal((4, 8, 8, 5)).astype(np.float32)
    x[0, 0:2, 0:2, 0] = 1.5                              # 4-way tie
    x[1, 2, 2:4, 1], x[1, 3, 2:4, 1] = 2.0, -1.0         # tie on the window's first row
    x[1, 4, 4, 1], x[1, 5, 4:6, 1], x[1, 4, 5, 1] = 0.1, 3.0, -2.0   # tie on its second row
    x[2, 4:6, 4:6, 2] = -0.5                             # all negative
    x[3, 0:2, 0:2, 3] = 0.0                              # all zero
    gy = g.standard_normal((4, 4, 4, 5)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    yt = F.max_pool2d(F.relu(xt), 2)
    yt.backward(torch.from_numpy(gy).permute(0, 3, 1, 2))
    y, vjp = jax.vjp(JM.relu_maxpool2, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(gy))
    assert np.array_equal(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.asarray(dx), xt.grad.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("name", MODELS)
def test_conversion_round_trip_is_exact(name):
    sd = state_to_numpy(init_model(name, SEED))
    if "bn1.running_var" in sd:  # non-trivial buffers
        sd["bn1.running_var"] = np.linspace(0.5, 2, 32, dtype=np.float32)
        sd["bn2.num_batches_tracked"] = np.asarray(12345, np.int64)
    back = convert.cnn_to_canonical(convert.cnn_from_canonical(sd))
    assert list(back) == list(sd)  # names AND state_dict order
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert np.array_equal(back[k], sd[k]), k


@pytest.mark.parametrize("conv_impl", JM.CONV_IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_logits_and_gradients_match_torch(name, conv_impl):
    model = _torch_model(name, random_bn=True)
    v = convert.cnn_from_canonical(state_to_numpy(model))
    spec = JM.get_spec(name)
    images, labels = _data(BATCH)
    x_t, y_t = to_input(torch.from_numpy(images)), torch.from_numpy(labels.astype(np.float32))
    x_j = jnp.asarray(images, jnp.float32) / 255.0

    # eval mode: dropout off, BN running statistics
    model.eval()
    with torch.no_grad():
        z_t = model(x_t).numpy()
    z_j, _ = JM.apply(spec, v, x_j, train=False, conv_impl=conv_impl)
    assert_close_tree({"logits": np.asarray(z_j)}, {"logits": z_t}, EVAL_ATOL,
                      f"{name}/{conv_impl} eval logits", relative=False)

    # train mode: batch statistics, dropout with a shared mask
    model.train()
    mask = _mask(0)
    if spec.dropout:
        model.dropout.mask = torch.from_numpy(mask)
    model.zero_grad()
    loss_t = F.binary_cross_entropy_with_logits(model(x_t), y_t)
    loss_t.backward()

    def loss_fn(params):
        z, stats = JM.apply(spec, {"params": params, "batch_stats": v.get("batch_stats", {})},
                            x_j, train=True, mask=jnp.asarray(mask), conv_impl=conv_impl)
        return JM.bce_with_logits(z, jnp.asarray(labels)), stats

    (loss_j, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
    assert abs(float(loss_j) - loss_t.item()) < EVAL_ATOL
    g_j, g_t = convert.cnn_params_to_canonical(g), _torch_grads(model)
    if spec.batchnorm:
        # A conv bias followed by BatchNorm has an exactly-zero true gradient (BN subtracts
        # the batch mean), so both engines return rounding noise there: check that it is
        # noise (tiny next to the model's largest gradient) instead of comparing noise.
        top = max(float(np.abs(a).max()) for a in g_t.values())
        for k in ("conv1.bias", "conv2.bias"):
            assert np.abs(g_j.pop(k)).max() < 1e-5 * top and np.abs(g_t.pop(k)).max() < 1e-5 * top
    assert_close_tree(g_j, g_t, GRAD_RTOL, f"{name}/{conv_impl} gradients")
    if spec.batchnorm:  # running stats after one training forward (momentum, unbiased var)
        got = convert.cnn_to_canonical({"params": v["params"], "batch_stats": stats})
        want = state_to_numpy(model)
        for k in ("bn1", "bn2"):
            assert int(got[f"{k}.num_batches_tracked"]) == int(want[f"{k}.num_batches_tracked"]) == 1
        assert_close_tree({k: got[k] for k in got if "running" in k},
                          {k: want[k] for k in want if "running" in k}, GRAD_RTOL,
                          f"{name} BN running statistics")


@pytest.mark.parametrize("conv_impl", JM.CONV_IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_trainer_logits_match_torch_eval(name, conv_impl):
    """The evaluation path (steps.logits: BatchNorm folded into the convolutions, lax.conv
    forward on the CPU, lax.map over chunks, whole blocks per call, a padded remainder)
    against torch's eval-mode forward, with non-trivial BN running statistics so the fold
    is exercised; 7 images per chunk, 3 chunks per call: two full calls, a padded one."""
    model = _torch_model(name, random_bn=True)
    images, _ = _data(50, seed=5)
    model.eval()
    with torch.no_grad():
        want = model(to_input(torch.from_numpy(images))).numpy()
    cfg = StepConfig.of(JM.get_spec(name), conv_impl=conv_impl)
    got = S.logits(cfg, convert.cnn_from_canonical(state_to_numpy(model)), images, chunk=7,
                   block=3)
    assert got.shape == (50,)
    assert_close_tree({"logits": got}, {"logits": want}, EVAL_ATOL,
                      f"{name}/{conv_impl} steps.logits", relative=False)
    one = S.logits(cfg, convert.cnn_from_canonical(state_to_numpy(model)), images[:1])  # unpadded
    assert abs(float(one[0]) - float(want[0])) < EVAL_ATOL


def _recipe(steps):
    """The recipe's ingredients squeezed into ``steps`` steps: a one-cycle that rises and
    falls within them, an EMA whose decay (0.9) makes the average differ visibly from the
    live weights after a few steps; label smoothing RECIPE_EPS goes with it."""
    return StepSchedule(lr0=2 * LR, schedule="onecycle", total_steps=steps, warmup_frac=0.3,
                        warmup_shape="cosine", div_factor=10.0, final_div_factor=100.0,
                        ema=0.9)


RECIPE_EPS = 0.1


def _adam_trajectories(name, dtype, steps=None, conv_impl="im2col", recipe=None, eps=0.0):
    """ADAM_STEPS steps of torch_cnn.train.train_step and EpochRunner.step on identical
    batches, identical augmentation draws (v3) and identical dropout masks, from the same
    weights; with ``recipe`` (a StepSchedule) and label smoothing ``eps``, each step's lr and
    EMA decay from it, as both stacks' epochs take them. Returns (jax canonical tensors,
    torch canonical tensors, jax state, and the same two for the EMA: None without one)."""
    model = _torch_model(name)
    if dtype == np.float64:
        model = model.double()
    lr0 = LR if recipe is None else recipe.lr0
    opt = make_optimizer(model, lr0)
    ema_model = new_ema_model(model) if recipe is not None and recipe.ema else None
    pairs = ema_pairs(ema_model, model) if ema_model is not None else None
    spec = JM.get_spec(name)
    augment = name == "v3"
    cfg, tr = runner(spec, lr=lr0, batch_size=BATCH, augment=augment, seed=SEED, conv_impl=conv_impl,
                 dtype=jnp.float64 if dtype == np.float64 else jnp.float32, schedule=recipe,
                 label_smoothing=eps)
    state = init_state(cfg, convert.cnn_from_canonical(state_to_numpy(model)))
    images, labels = _data(64)
    n = len(labels)
    steps = steps or ADAM_STEPS
    for step in range(steps):
        epoch, k = divmod(step * BATCH, n)
        order = epoch_order(SEED, epoch, n)[k:k + BATCH]
        draws = augment_draws(SEED, epoch, n)[k:k + BATCH] if augment else identity_draws(BATCH)
        x_u8, y = images[order], labels[order]
        mask = _mask(step)
        if spec.dropout:
            model.dropout.mask = torch.from_numpy(mask)
        xt = torch.from_numpy(x_u8)
        if augment:
            xt = augment_torch(xt, torch.from_numpy(draws.dy), torch.from_numpy(draws.dx),
                               torch.from_numpy(draws.flip))
        # float64: pixels / 255 computed in float64, as the port does (to_input is float32)
        x_in = to_input(xt) if dtype == np.float32 else xt.permute(0, 3, 1, 2).double() / 255
        if recipe is not None and recipe.varies:
            set_lr(opt, recipe.lr(step))
        loss_t, _ = train_step(model, opt, x_in, torch.from_numpy(y.astype(dtype)), eps)
        if pairs is not None:
            ema_update(pairs, recipe.ema_decay(step))
        state, (loss_j, _) = tr.step(state, x_u8, y, draws, mask)
    got = convert.cnn_to_canonical(jax.tree_util.tree_map(np.asarray, state.variables))
    want = state_to_numpy(model)
    if spec.batchnorm:
        for k in ("bn1", "bn2"):
            assert int(got[f"{k}.num_batches_tracked"]) == steps
            assert int(want[f"{k}.num_batches_tracked"]) == steps
    assert int(state.opt.count) == steps
    drop = lambda d: {k: v for k, v in d.items() if "num_batches" not in k}  # noqa: E731
    if ema_model is None:
        return drop(got), drop(want), state, None, None
    got_ema = convert.cnn_to_canonical(jax.tree_util.tree_map(np.asarray, state.ema))
    want_ema = state_to_numpy(ema_model)
    for tree in (got, want):  # BN's buffers are copied from the live model, not averaged
        ema = got_ema if tree is got else want_ema
        for k in tree:
            if "running" in k or "num_batches" in k:
                np.testing.assert_array_equal(ema[k], tree[k], err_msg=k)
    return drop(got), drop(want), state, drop(got_ema), drop(want_ema)


@pytest.mark.parametrize("conv_impl", CPU_CONV_IMPLS)
@pytest.mark.parametrize("name", ["v3"])  # v3 has every feature (BN, dropout, augmentation)
def test_adam_trajectory_matches_torch_in_float64(name, conv_impl):
    """In float64 the engines' gradients differ by ~1e-16, far below Adam's eps (1e-8),
    so Adam's normalisation cannot amplify them: the trajectories must agree closely,
    conv biases under BatchNorm (whose true gradient is zero) included."""
    with jax.enable_x64(True):
        got, want = _adam_trajectories(name, np.float64, ADAM_STEPS_64, conv_impl)[:2]
    assert_close_tree(got, want, TRAIN64_RTOL, f"{name} after {ADAM_STEPS_64} float64 Adam steps")


@pytest.mark.parametrize("conv_impl", CPU_CONV_IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_adam_trajectory_matches_torch_in_float32(name, conv_impl):
    """float32: the engines' gradients differ by ~1e-7 relative; Adam steps each weight by
    ~lr * m_hat / (sqrt(v_hat) + eps), which for a weight whose gradient is near zero
    (rarely active fc1 inputs; conv biases under BatchNorm, whose true gradient is exactly
    zero) turns that rounding difference into a step difference of up to lr, kept alive
    by the momentum. So single weights can drift apart by O(lr) over the run while the
    tensors as a whole stay close: compared per tensor by relative Frobenius norm."""
    got, want = _adam_trajectories(name, np.float32, conv_impl=conv_impl)[:2]
    _assert_float32_trajectory(got, want, name, ADAM_STEPS * LR,
                               f"{name} after {ADAM_STEPS} float32 Adam steps")


def _assert_float32_trajectory(got, want, name, lr_sum, what):
    """The float32 comparison of test_adam_trajectory_matches_torch_in_float32; ``lr_sum``:
    the learning rates of the steps taken, summed (the walk's bound)."""
    bad = {}
    for k in want:
        if k in ("conv1.bias", "conv2.bias", "bn1.running_mean", "bn2.running_mean") \
                and name == "v3":
            # biases before BN do a random walk on rounding noise in BOTH engines (zero true
            # gradient, Adam normalises noise to ~lr steps); running_mean carries them. They
            # do not change the network's function (BN subtracts them): bound the walk.
            assert np.max(np.abs(got[k] - want[k])) <= 2 * lr_sum, k
            continue
        err = np.linalg.norm(got[k].astype(np.float64) - want[k]) / np.linalg.norm(want[k])
        if err > TRAIN32_FRO[name]:
            bad[k] = err
    assert not bad, f"{what}, relative Frobenius error > {TRAIN32_FRO[name]}: " + \
        ", ".join(f"{k}: {e:.2e}" for k, e in bad.items())


def _jax_loss_and_grads(cfg, v, images, labels, mask) -> tuple[float, dict]:
    """The port's training loss (``steps.loss_fn``) on uint8 ``images`` with the dropout
    keep-mask, and its gradients under canonical names."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    (loss, _), g = jax.value_and_grad(functools.partial(loss_fn, cfg), has_aux=True)(
        v["params"], v["batch_stats"], x, jnp.asarray(labels), jnp.asarray(mask))
    return float(loss), convert.cnn_params_to_canonical(g)


def _assert_v3_grads_match(g_j: dict, model, what: str) -> None:
    """The port's v3 gradients against the torch model's (after its backward). The conv
    biases before BatchNorm have a zero true gradient: both engines must give noise there."""
    g_t = _torch_grads(model)
    top = max(float(np.abs(a).max()) for a in g_t.values())
    for k in ("conv1.bias", "conv2.bias"):
        assert np.abs(g_j.pop(k)).max() < 1e-5 * top and np.abs(g_t.pop(k)).max() < 1e-5 * top
    assert_close_tree(g_j, g_t, GRAD_RTOL, what)



# ------------------------------------------------------------------ the recipe (v3-recipe)
@pytest.mark.parametrize("conv_impl", CPU_CONV_IMPLS)
def test_label_smoothed_loss_and_gradients_match_torch(conv_impl):
    """BCE against y (1 - eps) + eps / 2 (core.recipe.smooth_targets) in both engines: the
    loss and every gradient of v3 in train mode, with a shared dropout mask."""
    model = _torch_model("v3", random_bn=True)
    v = convert.cnn_from_canonical(state_to_numpy(model))
    spec = JM.get_spec("v3")
    images, labels = _data(BATCH)
    mask = _mask(0)
    model.train()
    model.dropout.mask = torch.from_numpy(mask)
    model.zero_grad()
    y_t = smooth_targets(torch.from_numpy(labels.astype(np.float32)), RECIPE_EPS)
    np.testing.assert_allclose(y_t.numpy(), np.where(labels == 1, 0.95, 0.05), rtol=1e-6)
    loss_t = F.binary_cross_entropy_with_logits(model(to_input(torch.from_numpy(images))), y_t)
    loss_t.backward()
    loss_j, g_j = _jax_loss_and_grads(StepConfig.of(spec, conv_impl=conv_impl,
                                                    label_smoothing=RECIPE_EPS),
                                      v, images, labels, mask)
    assert abs(loss_j - loss_t.item()) < EVAL_ATOL
    plain, _ = _jax_loss_and_grads(StepConfig.of(spec, conv_impl=conv_impl), v, images, labels,
                                   mask)
    assert abs(plain - loss_j) > 1e-3  # the smoothing is really applied
    _assert_v3_grads_match(g_j, model, f"v3/{conv_impl} label-smoothed gradients")


@pytest.mark.parametrize("conv_impl", CPU_CONV_IMPLS)
def test_dropout_p_loss_and_gradients_match_torch(conv_impl):
    """A dropout probability other than the original's 0.5 (--dropout-p 0.2): torch's
    nn.Dropout(0.2) built by the spec, and JAX's inverted dropout scaling the kept units by
    1 / 0.8, give the same v3 loss and gradients for a shared mask."""
    p = 0.2
    model = init_model("v3", SEED, dropout_p=p)
    assert model.dropout.p == p
    model.dropout = FixedMaskDropout(p)
    v = convert.cnn_from_canonical(state_to_numpy(model))
    spec = JM.get_spec("v3", dropout_p=p)
    images, labels = _data(BATCH)
    mask = _mask(0, p=p)
    assert 0.15 < 1 - mask.mean() < 0.25
    model.train()
    model.dropout.mask = torch.from_numpy(mask)
    model.zero_grad()
    loss_t = F.binary_cross_entropy_with_logits(model(to_input(torch.from_numpy(images))),
                                                torch.from_numpy(labels.astype(np.float32)))
    loss_t.backward()
    loss_j, g_j = _jax_loss_and_grads(StepConfig.of(spec, conv_impl=conv_impl), v, images,
                                      labels, mask)
    assert abs(loss_j - loss_t.item()) < EVAL_ATOL
    half, _ = _jax_loss_and_grads(StepConfig.of(JM.get_spec("v3"), conv_impl=conv_impl), v,
                                  images, labels, mask)
    assert abs(half - loss_j) > 1e-4  # the scale 1 / (1 - p) is p's
    _assert_v3_grads_match(g_j, model, f"v3/{conv_impl} dropout_p {p} gradients")


@pytest.mark.parametrize("conv_impl", CPU_CONV_IMPLS)
def test_recipe_trajectory_matches_torch_in_float64(conv_impl):
    """One-cycle lr set per step, label smoothing and the EMA of the parameters over
    ADAM_STEPS_64 v3 steps in float64: the live weights and the moving averages agree as
    closely as the plain Adam trajectory does."""
    recipe = _recipe(ADAM_STEPS_64)
    with jax.enable_x64(True):
        got, want, _, got_ema, want_ema = _adam_trajectories(
            "v3", np.float64, ADAM_STEPS_64, conv_impl, recipe=recipe, eps=RECIPE_EPS)
    assert_close_tree(got, want, TRAIN64_RTOL, f"v3 after {ADAM_STEPS_64} float64 recipe steps")
    assert_close_tree(got_ema, want_ema, TRAIN64_RTOL, "v3 EMA after float64 recipe steps")
    # the average is not the live model (the comparison above could fail)
    assert np.abs(got_ema["fc1.weight"] - got["fc1.weight"]).max() > 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_recipe_trajectory_matches_torch_in_float32(name):
    """The same in float32 on every CNN, compared as the plain float32 trajectory is."""
    recipe = _recipe(ADAM_STEPS)
    got, want, _, got_ema, want_ema = _adam_trajectories(name, np.float32, recipe=recipe,
                                                         eps=RECIPE_EPS)
    lr_sum = float(np.sum(recipe.lr(np.arange(ADAM_STEPS))))
    _assert_float32_trajectory(got, want, name, lr_sum, f"{name} after float32 recipe steps")
    _assert_float32_trajectory(got_ema, want_ema, name, lr_sum, f"{name} EMA, float32 recipe")


@pytest.mark.parametrize("conv_impl", JM.CONV_IMPLS)
def test_flip_tta_logits_match_torch(conv_impl):
    """steps.logits with tta="flip" (folded BN, chunks, padding) against torch's
    FlipAverage(model) in eval mode, and it is not the plain forward."""
    model = _torch_model("v3")
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn2.running_mean.uniform_(-0.3, 0.3)
    images, _ = _data(50, seed=9)
    tta = FlipAverage(model).eval()
    with torch.no_grad():
        want = tta(to_input(torch.from_numpy(images))).numpy()
        plain = model(to_input(torch.from_numpy(images))).numpy()
    v = convert.cnn_from_canonical(state_to_numpy(model))
    got = S.logits(StepConfig.of(JM.get_spec("v3"), conv_impl=conv_impl, tta="flip"), v,
                   images, chunk=7, block=3)
    assert_close_tree({"logits": got}, {"logits": want}, EVAL_ATOL, f"v3/{conv_impl} flip TTA",
                      relative=False)
    assert np.abs(want - plain).max() > 1e-3
    # torch's evaluate() with the wrapper (what the stack evaluates) is the same function
    from data.cache import Split
    split = Split(images, np.zeros(50, np.uint8), np.zeros(50, np.uint8), np.zeros(50, "S20"),
                  np.zeros(50, "U1"))
    np.testing.assert_array_equal(evaluate(tta, split, "cpu", batch_size=50), want)


@pytest.mark.parametrize("name, dropout_p", [("baseline", None), ("v3", 0.0)])
def test_recipe_epochs_of_both_stacks_agree(name, dropout_p):
    """Two whole epochs of each stack's own train_epoch (torch_cnn.train.TorchCNN and
    jax_port.train.JaxPort: the per-step schedule indexed over the run, the partial last
    batch, the EMA, label smoothing) from one configuration, then each stack's evaluation
    (EMA weights, flip TTA). The stacks draw their dropout masks from different generators,
    so the trajectory is fully determined only without dropout: baseline, and v3 with
    ``dropout_p`` 0 (BatchNorm and the shared augmentation draws too, and the configuration's
    dropout_p reaching both stacks). 40 images in batches of 16 = 3 steps per epoch."""
    from data.cache import CIFAKE, Split
    from core.catalog import ONECYCLE_DEFAULTS
    from jax_port.train import JaxPort
    from torch_cnn.train import TorchCNN
    images, labels = _data(40, seed=3)
    split = Split(images, labels, np.zeros(40, np.uint8), np.zeros(40, "S20"), np.zeros(40, "U1"))
    ds = CIFAKE(split, split, {})
    cfg = {"model": name, "seed": SEED, "device": "cpu", "lr": 2 * LR, "batch_size": 16,
           "epochs": 2, "augment": name == "v3", "decay": 0.0, "dtype": "float32",
           "hidden": None, "dropout_p": dropout_p,
           "schedule": "onecycle", **ONECYCLE_DEFAULTS, "warmup_frac": 0.3,
           "label_smoothing": RECIPE_EPS, "ema_decay": 0.5, "tta": "flip",
           # each stack's own
           "threads": None, "channels_last": False, "pipeline": "device", "workers": 0,
           "conv_impl": "im2col"}
    ts, js = TorchCNN(), JaxPort()
    ts.build(dict(cfg), ds)
    js.build(dict(cfg), ds)
    for epoch in (0, 1):
        rt = ts.train_epoch(epoch, lambda *a: None)
        rj = js.train_epoch(epoch, lambda *a: None)
        assert rt["lr"] == pytest.approx(rj["lr"], rel=1e-6)
        assert abs(rt["train_loss"] - rj["train_loss"]) < 1e-4
    assert rt["lr"] == ts.schedule.lr(3) and ts.schedule.total_steps == 6
    assert ts.optimizer.param_groups[0]["lr"] == ts.schedule.lr(5)  # the last step's
    # Six Adam steps on noise images let single rarely-used weights drift apart by rounding
    # (see test_adam_trajectory_matches_torch_in_float32), so whole tensors are compared, by
    # relative Frobenius norm: a schedule off by one step moves them by ~1e-2.
    for what, jtree, tmodel in (("live", js.state.variables, ts.model),
                                ("EMA", js.state.ema, ts.ema_model)):
        got = convert.cnn_to_canonical(jax.tree_util.tree_map(np.asarray, jtree))
        want = state_to_numpy(tmodel)
        # Under BatchNorm a conv bias has an exactly-zero true gradient: Adam turns each
        # engine's rounding noise there into full-size steps of its own, and BN's running
        # mean takes that walk in; the eval logits below (running statistics in use)
        # compare what reaches the output.
        skip = ("conv1.bias", "conv2.bias", "bn1.running_mean", "bn2.running_mean") \
            if name == "v3" else ()
        for k in (k for k in want if k not in skip):
            err = np.linalg.norm(got[k].astype(np.float64) - want[k]) / np.linalg.norm(want[k])
            assert err < RECIPE_EPOCH_FRO, (what, k, err)
    z_t, z_j = ts.logits(split), js.logits(split)
    # v3: the conv biases' and running means' noise walks above do not cancel exactly in
    # eval mode (the running mean averages the bias over the steps), hence a wider bound
    assert_close_tree({"z": z_j}, {"z": z_t}, 1e-4 if name == "baseline" else 2e-3,
                      f"{name} recipe eval logits", relative=False)


def test_compiled_epoch_follows_torch_device_pipeline():
    """A whole compiled epoch (scan over full batches + one partial batch) visits the
    batches of torch_cnn's DevicePipeline for the same (seed, epoch): baseline model
    (no dropout, so the trajectory is fully determined), 40 images in batches of 16."""
    from data.cache import Split
    model = init_model("baseline", SEED)
    opt = make_optimizer(model, LR)
    images, labels = _data(40, seed=3)
    split = Split(images, labels, np.zeros(40, np.uint8), np.zeros(40, "S20"), np.zeros(40, "U1"))
    cfg, tr = runner(JM.get_spec("baseline"), lr=LR, batch_size=16, seed=SEED,
                     conv_impl="im2col", rng_epoch_offset=1)  # torch_cnn keys its epochs from 1
    state = init_state(cfg, convert.cnn_from_canonical(state_to_numpy(model)))
    pipe = DevicePipeline(split)
    losses = []
    for x, y in pipe.batches(SEED, 1, 16, augment=False):
        losses.append(train_step(model, opt, x, y)[0].item())
    state, row = tr.run_epoch(state, jnp.asarray(images), jnp.asarray(labels), 0)
    assert abs(row["train_loss"] - np.mean(losses)) < 1e-4
    assert_close_tree(convert.cnn_to_canonical(jax.tree_util.tree_map(np.asarray, state.variables)),
                      state_to_numpy(model), EPOCH_RTOL, "baseline after one compiled epoch")


def test_optax_adam_is_torch_adam():
    """torch.optim.Adam divides by sqrt(v_hat) + eps (eps outside the square root, with
    bias correction): optax.adam(eps_root=0). Gradients down to 1e-9 make eps matter."""
    g = np.random.default_rng(0)
    grads = (g.standard_normal((30, 200)) * np.logspace(-9, 0, 200)).astype(np.float32)
    p0 = g.standard_normal(200).astype(np.float32)
    pt = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.Adam([pt], lr=LR, betas=(ADAM_B1, ADAM_B2), eps=ADAM_EPS, foreach=False)

    def run(tx):
        p, st = jnp.asarray(p0), tx.init(jnp.asarray(p0))
        for gr in grads:
            u, st = tx.update(jnp.asarray(gr), st, p)
            p = optax.apply_updates(p, u)
        return np.asarray(p)

    for gr in grads:
        pt.grad = torch.from_numpy(gr)
        opt.step()
    want = pt.detach().numpy()
    got = run(optax.adam(LR, ADAM_B1, ADAM_B2, ADAM_EPS))
    assert np.max(np.abs(got - want)) < 1e-6
    # the check can fail: eps inside the square root gives a visibly different trajectory
    wrong = run(optax.adam(LR, ADAM_B1, ADAM_B2, eps=0.0, eps_root=ADAM_EPS))
    assert np.max(np.abs(wrong - want)) > 1e-4


def test_torch_checkpoint_evaluates_the_same_in_jax(mini_zip, tmp_path, capsys):
    """Train 2 epochs with the torch CLI (--subset 200 of the mini archive), then evaluate
    its model.safetensors with jax_port on the same test split: same accuracy and loss as
    torch's own final metrics (logits differ by float32 rounding only, EVAL_ATOL)."""
    import json

    from data import load_cifake
    from data.errors import run_cli
    from core.metrics import classification_report
    from jax_port import checkpoint
    from torch_cnn import train as TT
    run, cache = tmp_path / "torch-run", tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        run_cli(TT.main, ["--model", "baseline", "--epochs", "2", "--subset", "200", "--data",
                          str(mini_zip), "--cache-dir", str(cache), "--out", str(run),
                          "--no-progress", "--device", "cpu"])
    assert e.value.code == 0, capsys.readouterr().err
    torch_final = json.loads((run / "metrics.json").read_text())["final"]

    spec, variables, _ = checkpoint.load(run / "model.safetensors", "baseline")
    ds = load_cifake(mini_zip, cache, subset=200, verbose=False)
    z = S.logits(StepConfig.of(spec), variables, ds.test.images)
    rep = classification_report(z, ds.test.labels)
    assert rep["n"] == torch_final["test"]["n"] == 400
    # an image can only change side if its logit is within rounding of 0
    near_zero = int(np.sum(np.abs(z) < EVAL_ATOL))
    assert abs(rep["accuracy"] - torch_final["test"]["accuracy"]) <= 100 * near_zero / rep["n"]
    assert rep["confusion"] == torch_final["test"]["confusion"] or near_zero
    assert abs(rep["loss"] - torch_final["test"]["loss"]) < EVAL_ATOL
    # both classes predicted, so agreeing on accuracy is not agreeing on a constant answer
    assert all(sum(row[c] for row in rep["confusion"]) > 0 for c in (0, 1)), rep["confusion"]
