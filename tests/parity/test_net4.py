"""net4 (core/architecture.py) in the torch spec and the JAX port, micrograd-style: the
same weights and batch in both engines, logits, loss, every gradient and BatchNorm's
running statistics compared -- in float64 to ~1e-10 for each convolution formulation, in
float32 against the spec's own float32 error -- then the poolings' tie rule, the tensor
table, initial weights and conversion, and training through each stack's own step and
epoch functions. Small batches: the whole file is meant to take well under a minute on
one core."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from core.architecture import cnn_tensors, layer_macs, train_flops
from core.init import cnn_init
from data.batching import augment_draws, epoch_order
from jax_port import convert
from jax_port import model as JM
from jax_port import steps as S
from tests.helpers import assert_close_tree
from tests.jax_helpers import runner
from torch_cnn.checkpoint import state_to_numpy
from torch_cnn.model import FlipAverage, init_model, param_count
from torch_cnn.pipeline import augment_torch
from torch_cnn.train import make_optimizer, train_step

torch.set_num_threads(1)  # tiny tensors; the test machine is shared

SEED = 5
BATCH = 6
# float64: the engines sum in different orders (im2col matmul, lax.conv, torch's kernels),
# ~1e-16 relative per operation; through 7 convolutions and 7 BatchNorms measured <= 3.4e-14
# (relative to each tensor's max |value|, every formulation). 1e-10 leaves room for other BLAS.
F64_TOL = 1e-10
# float32: the port's error against the float64 spec may be at most this many times the
# torch spec's own float32 error against the same reference (plus FLOOR, for quantities
# that torch happens to round exactly): a port computing the same function in float32
# lands at the same order of error; a wrong function lands orders of magnitude away.
# Measured: the port's error <= 5.7e-6 on every quantity; torch's 8e-7 .. 1.3e-2 (its
# largest on the stem's gradients: stem.bn.bias 1.3e-2, not a max-pool tie flipped --
# checked -- but its float32 sums); the worst port / torch ratio 1.43 (block3.bn2.bias).
F32_FACTOR = 10.0
F32_FLOOR = 1e-6
EVAL_ATOL = 1e-5  # float32 eval logits, absolute (as tests/parity/test_parity_cnn.py)


def _torch_model(dtype=torch.float32):
    """net4 for SEED with every BatchNorm's scale (some negative), shift and running
    statistics drawn away from 1 / 0 / 0 / 1, at which eval-mode BN is nearly the identity."""
    m = init_model("net4", SEED)
    g = np.random.default_rng(1)
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            c = bn.num_features
            bn.running_mean.copy_(torch.from_numpy(g.normal(0, 0.3, c)))
            bn.running_var.copy_(torch.from_numpy(g.uniform(0.2, 3, c)))
            bn.weight.copy_(torch.from_numpy(g.uniform(0.5, 1.5, c) * g.choice([-1, 1], c)))
            bn.bias.copy_(torch.from_numpy(g.normal(0, 0.2, c)))
    return m.to(dtype)


def _data(n=BATCH, seed=0):
    g = np.random.default_rng(seed)
    return (g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            g.integers(0, 2, n).astype(np.uint8))


def _copy(model):
    """The model's canonical tensors as copies (``state_to_numpy`` shares the buffers, which
    a training forward then updates in place)."""
    return {k: a.copy() for k, a in state_to_numpy(model).items()}


def _stats(sd):
    return {k: v for k, v in sd.items() if "running" in k or "num_batches" in k}


def _torch_run(model, images, labels):
    """Train-mode logits, loss, gradients, running statistics after that forward, then
    eval-mode logits with them, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255
    model.train()
    model.zero_grad()
    z = model(x)
    loss = F.binary_cross_entropy_with_logits(z, torch.from_numpy(labels).to(dtype))
    loss.backward()
    model.eval()
    with torch.no_grad():
        z_eval = model(x)
    return {"logits": z.detach().numpy(), "loss": np.asarray(loss.item()),
            "eval": z_eval.numpy(), **{f"grad {k}": p.grad.numpy().copy()
                                       for k, p in model.named_parameters()},
            **_stats(state_to_numpy(model))}


def _jax_run(sd, images, labels, conv_impl, dtype):
    """The same in JAX from the canonical tensors ``sd`` (their dtype is the run's)."""
    spec = JM.get_spec("net4")
    v = jax.tree_util.tree_map(jnp.asarray, convert.cnn_from_canonical(sd))
    x = jnp.asarray(images).astype(dtype) / 255

    @jax.jit
    def run(v, x, y):
        def loss(params):
            z, st = JM.apply(spec, {"params": params, "batch_stats": v["batch_stats"]}, x,
                             train=True, conv_impl=conv_impl)
            return JM.bce_with_logits(z, y), (z, st)
        (l, (z, st)), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        new = {"params": v["params"], "batch_stats": st}
        return l, z, g, new, JM.apply(spec, new, x, train=False, conv_impl=conv_impl)[0]
    l, z, g, new, z_eval = jax.tree_util.tree_map(np.asarray, run(v, x, jnp.asarray(labels)))
    return {"logits": z, "loss": l, "eval": z_eval,
            **{f"grad {k}": a for k, a in convert.cnn_params_to_canonical(g).items()},
            **_stats(convert.cnn_to_canonical(new))}


@pytest.mark.parametrize("conv_impl", JM.CONV_IMPLS)
def test_float64_logits_gradients_and_stats_match_torch(conv_impl):
    """float64, train mode (batch statistics) then eval mode (the updated running ones):
    every quantity within F64_TOL, relative to its tensor's largest |value|."""
    model = _torch_model(torch.float64)
    images, labels = _data()
    sd = _copy(model)
    want = _torch_run(model, images, labels)
    with jax.enable_x64(True):
        got = _jax_run(sd, images, labels, conv_impl, jnp.float64)
    assert got["logits"].dtype == np.float64 and got["grad fc.weight"].dtype == np.float64
    for k in want:
        if k.endswith("num_batches_tracked"):
            assert int(got[k]) == int(want[k]) == 1, k
    assert set(got) == set(want) and len([k for k in want if k.startswith("grad")]) == 23
    assert_close_tree(got, want, F64_TOL, f"net4/{conv_impl} float64")


# the formulations the port trains with by default (CPU: hybrid; GPU: xla); im2col's
# function is checked in float64 above, and its autodiff compiles slowest (~6 s here)
@pytest.mark.parametrize("conv_impl", ["hybrid", "xla"])
def test_float32_error_is_the_specs_own(conv_impl):
    """float32, the same quantities against the float64 spec: the port's error is of the
    order of torch's own float32 error (F32_FACTOR x, + F32_FLOOR), tensor by tensor."""
    images, labels = _data()
    ref = _torch_run(_torch_model(torch.float64), images, labels)
    model = _torch_model()
    sd = _copy(model)
    t32 = _torch_run(model, images, labels)
    j32 = _jax_run(sd, images, labels, conv_impl, jnp.float32)
    bad = {}
    for k, r in ref.items():
        if k.endswith("num_batches_tracked"):
            continue
        scale = max(float(np.abs(r).max()), 1e-30)
        e_t = float(np.abs(t32[k] - r).max()) / scale
        e_j = float(np.abs(j32[k] - r).max()) / scale
        if e_j > F32_FACTOR * e_t + F32_FLOOR:
            bad[k] = (e_j, e_t)
    assert not bad, f"net4/{conv_impl} float32, (port error, torch error) vs float64: {bad}"


def test_eval_path_matches_torch_eval():
    """steps.logits (BatchNorm folded where it follows a conv, bn1 kept after the pool,
    chunks, a padded remainder) and flip TTA against torch's eval forward, with BN scales
    of both signs."""
    model = _torch_model().eval()
    images, _ = _data(11, seed=4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want, want_tta = model(x).numpy(), FlipAverage(model)(x).numpy()
    v = convert.cnn_from_canonical(state_to_numpy(model))
    spec = JM.get_spec("net4")
    folded_spec, folded = JM.fold_batchnorm(spec, v)
    assert "bn" not in folded["params"]["stem"] and "bn1" in folded["params"]["block1"]
    with pytest.raises(ValueError, match="evaluates only"):
        JM.apply(folded_spec, folded, jnp.zeros((1, 32, 32, 3)), train=True)
    for tta, w in (("none", want), ("flip", want_tta)):
        got = S.logits(S.StepConfig.of(spec, conv_impl="hybrid", tta=tta), v, images,
                       chunk=4, block=2)
        assert_close_tree({"z": got}, {"z": w}, EVAL_ATOL, f"net4 eval, tta {tta}",
                          relative=False)


def test_poolings_send_tied_gradients_where_torch_does():
    """Exact ties: torch's max_pool2d gives a window's whole gradient to its FIRST maximum
    in row-major order, for the 2x2 pooling and for the global one (max_pool2d over the
    whole map, what Net4 uses); maxpool2_first and global_maxpool_first must too, bit for
    bit. Autodiff of a plain max splits it among the ties (checked: the test can fail)."""
    g = np.random.default_rng(0)
    x = g.standard_normal((2, 8, 8, 3))
    x[0, 0:2, 0:2, 0] = 0.0                          # 4-way tie at 0 (an all-zero neighbourhood)
    x[0, 2:4, 2:4, 1] = [[-1.0, 0.5], [0.5, 0.5]]    # ties at (0,1), (1,0), (1,1)
    x[1, 4:6, 0:2, 2] = [[0.1, -1.0], [0.7, 0.7]]    # tie on the window's second row
    x[1, 6:8, 6:8, 0] = [[2.0, 2.0], [2.0, -3.0]]    # tie on its first row and below
    x[0, :, :, 2] = 0.0                              # a whole map tied (global pool)
    x[1, 3, 5, 1] = x[1, 6, 2, 1] = 9.0              # the global max twice
    gy2, gyg = g.standard_normal((2, 4, 4, 3)), g.standard_normal((2, 3))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    (F.max_pool2d(xt, 2).permute(0, 2, 3, 1) * torch.from_numpy(gy2)).sum().backward()
    want2, xt.grad = xt.grad.permute(0, 2, 3, 1).numpy(), None
    (F.max_pool2d(xt, (8, 8)).flatten(1) * torch.from_numpy(gyg)).sum().backward()
    want_g = xt.grad.permute(0, 2, 3, 1).numpy()
    with jax.enable_x64(True):
        xj = jnp.asarray(x)
        for f, plain, gy, want in ((JM.maxpool2_first, JM.maxpool2, gy2, want2),
                                   (JM.global_maxpool_first, lambda a: a.max(axis=(1, 2)),
                                    gyg, want_g)):
            y, vjp = jax.vjp(f, xj)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(plain(xj)))
            np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(gy))[0]), want)
            split = np.asarray(jax.vjp(plain, xj)[1](jnp.asarray(gy))[0])
            assert not np.array_equal(split, want)


def test_tensor_table_init_and_conversion():
    """The table's names and order; cnn_init draws it (torch's default distributions);
    torch's init_model and the port's init_variables start from exactly those arrays; the
    canonical <-> flax conversion is lossless (non-trivial buffers, params alone too);
    the parameter count and FLOPs the architecture's docstring reports."""
    table = cnn_tensors("net4")
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = ["stem.conv.weight", *(f"stem.bn.{k}" for k in bn)]
    for b in (1, 2, 3):
        names += [f"block{b}.conv1.weight", *(f"block{b}.bn1.{k}" for k in bn),
                  f"block{b}.conv2.weight", *(f"block{b}.bn2.{k}" for k in bn)]
    assert list(table) == names + ["fc.weight", "fc.bias"]
    assert table["block3.conv2.weight"] == ((128, 128, 3, 3), "float32")
    assert table["fc.weight"] == ((1, 128), "float32")
    sd = cnn_init("net4", SEED)
    assert {k: (a.shape, str(a.dtype)) for k, a in sd.items()} == table
    for k, a in sd.items():
        if ".bn" in k:
            const = {"weight": 1, "bias": 0, "running_mean": 0, "running_var": 1}
            assert np.all(a == const.get(k.rsplit(".", 1)[1], 0)), k
        else:
            fan_in = 128 if k.startswith("fc") else int(np.prod(table[k.replace(
                "bias", "weight")][0][1:]))
            assert 0 < np.abs(a).max() <= 1 / np.sqrt(fan_in), k
    model = init_model("net4", SEED)
    for other in (state_to_numpy(model),
                  convert.cnn_to_canonical(JM.init_variables(JM.get_spec("net4"), SEED))):
        assert list(other) == list(sd)
        for k in sd:
            assert other[k].dtype == sd[k].dtype and np.array_equal(other[k], sd[k]), k
    g = np.random.default_rng(2)
    busy = {k: (np.asarray(12345, np.int64) if "num_batches" in k
                else g.standard_normal(a.shape).astype(np.float32)) for k, a in sd.items()}
    for tensors, there, back in ((busy, convert.cnn_from_canonical, convert.cnn_to_canonical),
                                 ({k: a for k, a in busy.items() if k not in _stats(busy)},
                                  convert.cnn_params_from_canonical,
                                  convert.cnn_params_to_canonical)):
        out = back(there(tensors))
        assert list(out) == list(tensors)
        for k in tensors:
            assert out[k].dtype == tensors[k].dtype and np.array_equal(out[k], tensors[k]), k
    v = convert.cnn_from_canonical(busy)
    assert v["params"]["block2"]["conv1"]["kernel"].shape == (3, 3, 32, 64)
    assert v["batch_stats"]["block1"]["bn2"]["num_batches_tracked"].dtype == np.int32
    assert param_count(model) == 291_793 == sum(
        int(np.prod(s)) for k, (s, _) in table.items() if k not in _stats(table))
    assert sum(layer_macs("net4")) == 21_676_160
    assert train_flops("net4") == 129_172_224 and train_flops("v3") == 44_436_480


def test_a_run_scores_the_same_in_both_stacks_detectors(tmp_path):
    """A net4 run directory (model.safetensors written by torch_cnn's checkpoint, flip TTA
    in config.json) read by each stack's checkpoint loader and scored by each stack's
    Detector: the same tensors, the same P(FAKE)."""
    import json

    from core.rundir import RUN_FORMAT
    from jax_port import checkpoint as jax_checkpoint
    from jax_port.predict import Detector as JaxDetector
    from torch_cnn import checkpoint as torch_checkpoint
    from torch_cnn.predict import Detector as TorchDetector
    model = _torch_model()
    torch_checkpoint.save(tmp_path / "model.safetensors", model, "net4")
    (tmp_path / "config.json").write_text(json.dumps(
        {"run_format": RUN_FORMAT, "family": "cnn", "model": "net4", "tta": "flip"}))
    spec, v, meta = jax_checkpoint.load(tmp_path / "model.safetensors", "net4")
    assert spec == JM.get_spec("net4") and meta["model"] == "net4"
    sd = state_to_numpy(model)
    back = convert.cnn_to_canonical(v)
    assert list(back) == list(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    images, _ = _data(5, seed=6)
    p_t = TorchDetector.load(tmp_path, device="cpu").p_fake_batch(images)
    p_j = JaxDetector.load(tmp_path, device="cpu").p_fake_batch(images)
    # measured 7e-9 apart; the images' scores spread over 4e-5 (not one constant answer)
    assert np.abs(p_t - p_j).max() < 1e-6 and np.ptp(p_t) > 1e-5


def test_ddp_preparation_reaches_the_nested_batchnorms():
    """Several processes (torchrun): torch_cnn.distributed.prepare_model swaps every
    BatchNorm for its global-batch version, net4's inside the stem and blocks too, keeping
    the parameters, buffers and state_dict names."""
    from torch_cnn.distributed import AllReduceBatchNorm2d, prepare_model
    model = _torch_model()
    before = _copy(model)
    prepare_model(model, torch.device("cpu"))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 7 and all(isinstance(m, AllReduceBatchNorm2d) for m in bns)
    after = state_to_numpy(model)
    assert list(after) == list(before) and all(np.array_equal(after[k], before[k]) for k in after)


def test_flax_wrapper_builds_the_same_variables():
    spec = JM.get_spec("net4")
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)), jnp.float32)
    # traced, not run (eager net4 costs seconds): the wrapper's layout, shapes and dtypes;
    # its values are init_variables' by construction
    v = jax.eval_shape(JM.FlaxModel(spec, seed=SEED).init, jax.random.PRNGKey(0), x)
    ref = JM.init_variables(spec, SEED)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(ref)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), v) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), ref)


def test_dropout_p_is_refused():
    from data.errors import UserError
    with pytest.raises(UserError, match="dropout"):
        JM.get_spec("net4", dropout_p=0.2)
    with pytest.raises(ValueError, match="no dropout"):
        init_model("net4", 0, dropout_p=0.2)


def test_adam_steps_of_both_stacks_agree_in_float64():
    """Two Adam steps with augmentation: torch_cnn.train.train_step against the port's
    EpochRunner.step on the same batches and draws, float64 (no rounding for Adam's
    normalisation to amplify much; measured 7e-11 apart, relative to each tensor's max)."""
    model = _torch_model(torch.float64)
    opt = make_optimizer(model, 1e-3)
    images, labels = _data(16, seed=2)
    with jax.enable_x64(True):
        cfg, tr = runner(JM.get_spec("net4"), lr=1e-3, batch_size=8, augment=True, seed=SEED,
                         conv_impl="hybrid", dtype=jnp.float64)
        state = S.init_state(cfg, convert.cnn_from_canonical(state_to_numpy(model)))
        order, draws = epoch_order(SEED, 0, 16), augment_draws(SEED, 0, 16)
        for k in range(0, 16, 8):
            d = draws[k:k + 8]
            x_u8, y = images[order[k:k + 8]], labels[order[k:k + 8]]
            xt = augment_torch(torch.from_numpy(x_u8), torch.from_numpy(d.dy),
                               torch.from_numpy(d.dx), torch.from_numpy(d.flip))
            train_step(model, opt, xt.permute(0, 3, 1, 2).double() / 255,
                       torch.from_numpy(y.astype(np.float64)))
            state, _ = tr.step(state, x_u8, y, d)
        got = convert.cnn_to_canonical(jax.tree_util.tree_map(np.asarray, state.variables))
    want = state_to_numpy(model)
    n = "block3.bn2.num_batches_tracked"
    assert int(got[n]) == int(want[n]) == 2
    assert_close_tree(got, want, 1e-8, "net4 after 2 float64 Adam steps")
    assert np.abs(want["fc.weight"] - cnn_init("net4", SEED)["fc.weight"]).max() > 1e-4  # moved


def test_two_epochs_of_each_stacks_own_loop_agree():
    """Two epochs (2 batches of 32 each) of torch_cnn.train.TorchCNN and
    jax_port.train.JaxPort from the net4 preset's recipe (one-cycle lr over the run's 4
    steps, flip TTA, augmentation) with an EMA added, float32: the epoch order, augmentation
    draws and schedule of the second epoch as well as the first.

    At batch 32 the engines' rounding stays small (measured: train loss 1.4e-6 apart,
    parameters within 8e-5 relative Frobenius norm per tensor, eval logits 1.5e-6); the JAX
    side training its second epoch with the first epoch's order and draws instead: loss
    0.67 apart, tensors 0.5, logits 5e-3. (At batch 8 on 16 images net4 amplifies rounding
    until the second epoch's losses differ by 1e-2: Adam's first steps move a weight whose
    gradient is rounding noise by a full +-lr, and the max poolings route whole gradients
    by near-ties.)"""
    from core.catalog import AUGMENTED_MODELS, PRESETS
    from data.cache import CIFAKE, Split
    from jax_port.train import JaxPort
    from torch_cnn.train import TorchCNN
    n = 64
    images, labels = _data(n, seed=3)
    split = Split(images, labels, np.zeros(n, np.uint8), np.zeros(n, "S20"), np.zeros(n, "U1"))
    ds = CIFAKE(split, split, {})
    cfg = {**PRESETS["net4"], "seed": SEED, "device": "cpu", "batch_size": 32, "epochs": 2,
           "augment": "net4" in AUGMENTED_MODELS, "decay": 0.0, "dtype": "float32",
           "hidden": None, "ema_decay": 0.5,
           "threads": None, "channels_last": False, "pipeline": "device", "workers": 0,
           "conv_impl": "hybrid"}
    assert cfg["augment"] and cfg["tta"] == "flip"
    ts, js = TorchCNN(), JaxPort()
    ts.build(dict(cfg), ds)
    js.build(dict(cfg), ds)
    for epoch in (0, 1):
        rt, rj = ts.train_epoch(epoch, lambda *a: None), js.train_epoch(epoch, lambda *a: None)
        assert rt["lr"] == pytest.approx(rj["lr"], rel=1e-6)
        assert abs(rt["train_loss"] - rj["train_loss"]) < 1e-4
    assert ts.schedule.total_steps == 4 and rt["lr"] == ts.schedule.lr(2)  # epoch 2's first
    for what, jtree, tmodel in (("live", js.state.variables, ts.model),
                                ("EMA", js.state.ema, ts.ema_model)):
        got = convert.cnn_to_canonical(jax.tree_util.tree_map(np.asarray, jtree))
        want = state_to_numpy(tmodel)
        k = "stem.bn.num_batches_tracked"
        assert int(got[k]) == int(want[k]) == 4
        for k, _ in tmodel.named_parameters():
            err = np.linalg.norm(got[k].astype(np.float64) - want[k]) / np.linalg.norm(want[k])
            assert err < 1e-3, (what, k, err)
    assert_close_tree({"z": js.logits(split)}, {"z": ts.logits(split)}, 1e-4,
                      "net4 eval logits after two epochs", relative=False)
