"""Quick parity checks for the bench: does each non-reference backend compute the spec's function?

``python -m bench.speed.parity [--checks mlp4,v3,torch-device] [--json]`` (exit 1 if a check fails).

- ``mlp2`` / ``mlp4``: numpy_mlp (the spec) vs the JAX MLP, float64, weights converted with
  ``jax_port.convert``: logits, mean BCE and every gradient on one batch of 16 images.
- ``baseline`` / ``dropout`` / ``v3`` / ``net4``: torch_cnn (the spec) vs the JAX CNN, float32,
  weights converted from torch: eval-mode logits, then train-mode loss, every gradient and the BN
  running statistics on one batch of 8 images with the same dropout mask; for augmented
  models also JAX's on-device augmentation vs the NumPy reference (bit for bit). With the
  port's default convolution here (im2col on CPU); ``v3:xla`` checks ``lax.conv`` (the GPU one).
- ``torch-device``: the device pipeline's augmentation vs the NumPy reference (bit for bit),
  and its un-augmented batches vs the torchvision pipeline's (the same images).

Each check reports pass/fail and its max differences. These are a fast subset of the test
suite's parity tests (tests/parity/test_parity_*.py), run on the machine being benchmarked.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from data.batching import AugDraws, augment, dropout_rng

SEED = 0
# Tolerances. Float64 MLP: the two engines sum in different orders; 1e-10 relative leaves
# ~6 decimal digits of headroom over float64 rounding. Float32 CNN: logits are sums of ~10^4
# products rounded in a different order (im2col matmul vs torch's conv), ~1e-6 typical.
MLP_RTOL_F64 = 1e-10     # relative to the tensor's max |value|
CNN_LOGIT_ATOL = 1e-5    # absolute, logits and loss (as tests/parity/test_parity_cnn.py)
CNN_GRAD_RTOL = 1e-4     # relative to the tensor's max |value| (float32 accumulation order)
CNN_STAT_ATOL = 1e-5     # absolute, BN running mean/var after one step
CNN_ZERO_GRAD = 1e-5     # |gradient| / largest gradient of the model, where the true value is 0
MLP_BATCH, CNN_BATCH = 16, 8


def _images(n: int, seed: int):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), g.integers(0, 2, n).astype(np.uint8)


def _flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: np.asarray(tree)}


def max_diffs(a, b) -> dict[str, tuple[float, float]]:
    """The parity comparison, shared by this tool and the test suite: for every leaf of two
    trees (dicts of arrays, or two arrays), ``(max |a - b|, max |a - b| / max |b|)``, ``b``
    the reference. One scale per tensor, so entries near zero in a tensor of ordinary
    magnitude do not blow up the ratio. Different leaves or shapes raise AssertionError."""
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb), f"different tensors: only in first {sorted(set(fa) - set(fb))}, " \
                               f"only in second {sorted(set(fb) - set(fa))}"
    out = {}
    for k in fa:
        x, y = fa[k].astype(np.float64), fb[k].astype(np.float64)
        assert x.shape == y.shape, f"{k}: shapes {x.shape} vs {y.shape}"
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        out[k] = (d, d / scale if scale > 0 else d)
    return out


def _abs(a, b) -> float:
    return max_diffs(a, b)[""][0]


def _rel(a, b) -> float:
    return max_diffs(a, b)[""][1]


class FixedMaskDropout:
    """Builds torch's inverted dropout with a keep-mask the caller sets (``.mask``), so JAX
    can use the same one: ``x * mask / (1 - p)`` in training, the identity in evaluation."""

    def __new__(cls, p: float):
        import torch

        class _Dropout(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mask, self.p = None, p

            def forward(self, x):
                if not self.training:
                    return x
                return x * (self.mask.to(x.dtype) / (1.0 - self.p))
        return _Dropout()


def _finish(diffs: dict, tols: dict) -> dict:
    """diffs: name -> max difference; tols: name prefix -> tolerance (diff <= tol passes)."""
    def tol_of(k):
        return next(t for p, t in tols.items() if k.startswith(p))
    failed = [f"{k}: {v:.3g} > {tol_of(k):g}" for k, v in diffs.items() if not v <= tol_of(k)]
    # the comparison closest to its tolerance (exact-match checks count as 0 when they match)
    worst = max(diffs, key=lambda k: diffs[k] / tol_of(k) if tol_of(k) else 0.0)
    summary = ("; ".join(failed) if failed else
               f"{len(diffs)} comparisons within tolerance (closest: {worst} {diffs[worst]:.2g})")
    # JSON has no NaN/inf: a non-finite difference is reported as a string (and has failed)
    clean = {k: (v if np.isfinite(v) else str(v)) for k, v in diffs.items()}
    return {"passed": not failed, "summary": summary, "max_diffs": clean, "tolerances": tols}


# ------------------------------------------------------------------ MLP
def check_mlp(model: str) -> dict:
    import jax
    import jax.numpy as jnp
    from jax_port import convert
    from jax_port import model as jm
    from numpy_mlp import model as nm

    imgs, labels = _images(MLP_BATCH, 1)
    params = nm.init_params(nm.layer_dims_for(model), SEED, np.float64)
    X, Y = nm.images_to_X(imgs, np.float64), labels.reshape(1, -1).astype(np.float64)
    logits_np, caches = nm.forward(X, params)
    cost_np = nm.cost(logits_np, Y)
    grads_np = nm.backward(logits_np, Y, caches)

    spec = jm.get_spec(model)
    with jax.enable_x64(True):
        v = jax.tree_util.tree_map(jnp.asarray, convert.mlp_from_canonical(params))
        x = jnp.asarray(imgs, jnp.float64) / 255.0

        def loss(p):
            z, _ = jm.apply(spec, {"params": p}, x, train=True)
            return jm.bce_with_logits(z, jnp.asarray(labels)), z
        (cost_j, logits_j), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        grads_j = convert.mlp_to_canonical({"params": jax.tree_util.tree_map(np.asarray, g)})
        diffs = {"logits": _rel(logits_j, logits_np[0]), "cost": _rel(cost_j, cost_np)}
        for k in params:
            diffs[f"grad {k}"] = _rel(grads_j[k], grads_np[f"d{k}"])
    return _finish(diffs, {"logits": MLP_RTOL_F64, "cost": MLP_RTOL_F64,
                           "grad": MLP_RTOL_F64})


# ------------------------------------------------------------------ CNN
def check_cnn(model: str, conv_impl: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from jax_port import convert
    from jax_port import model as jm
    from torch_cnn.model import init_model
    from torch_cnn.pipeline import to_input

    imgs, labels = _images(CNN_BATCH, 2)
    net = init_model(model, SEED)
    sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    spec = jm.get_spec(model)
    conv_impl = conv_impl or jm.default_conv_impl()
    variables = jax.tree_util.tree_map(jnp.asarray, convert.cnn_from_canonical(sd))
    x_t = to_input(torch.from_numpy(imgs))
    x_j = jnp.asarray(imgs, jnp.float32) / 255.0
    net.eval()
    with torch.no_grad():
        ev_t = net(x_t).numpy()
    ev_j, _ = jm.apply(spec, variables, x_j, train=False, conv_impl=conv_impl)
    diffs = {"eval logits": _abs(ev_j, ev_t),
             **_cnn_train_diffs(net, spec, variables, x_t, x_j, labels, conv_impl)}
    tols = {"eval logits": CNN_LOGIT_ATOL, "train loss": CNN_LOGIT_ATOL,
            "grad": CNN_GRAD_RTOL, "zero grad": CNN_ZERO_GRAD, "bn stat": CNN_STAT_ATOL}
    if model in _augmented():
        diffs["augmentation mismatched pixels"] = _augmentation_mismatches()
        tols["augmentation"] = 0.0
    out = _finish(diffs, tols)
    out["conv_impl"] = conv_impl
    return out


def _cnn_train_diffs(net, spec, variables, x_t, x_j, labels, conv_impl) -> dict:
    """Train-mode loss, every gradient and BatchNorm's running statistics after one step's
    forward, torch against JAX, with the same dropout mask."""
    import jax
    import jax.numpy as jnp
    import torch
    from jax_port import convert
    from jax_port import model as jm
    mask = dropout_rng(SEED, 0).random((CNN_BATCH, 512)) < 1.0 - spec.dropout_p
    if spec.dropout:
        net.dropout = FixedMaskDropout(spec.dropout_p)
        net.dropout.mask = torch.from_numpy(mask)
    net.train()
    loss_t = torch.nn.functional.binary_cross_entropy_with_logits(
        net(x_t), torch.from_numpy(labels.astype(np.float32)))
    loss_t.backward()
    grads_t = {k: p.grad.numpy() for k, p in net.named_parameters()}

    def loss(p):
        z, st = jm.apply(spec, {"params": p, "batch_stats": variables.get("batch_stats", {})},
                         x_j, train=True, mask=jnp.asarray(mask) if spec.dropout else None,
                         conv_impl=conv_impl)
        return jm.bce_with_logits(z, jnp.asarray(labels)), st
    (loss_j, stats_j), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    diffs = {"train loss": _abs(loss_j, loss_t.item())}
    grads_j = convert.cnn_params_to_canonical(jax.tree_util.tree_map(np.asarray, g))
    top = max(float(np.abs(a).max()) for a in grads_t.values())
    for k, gt in grads_t.items():
        if spec.batchnorm and k in ("conv1.bias", "conv2.bias"):
            # A conv bias followed by BatchNorm has an exactly-zero true gradient (BN subtracts
            # the batch mean): both engines return rounding noise, so check that it IS noise
            # (tiny next to the largest gradient) instead of comparing noise with noise.
            diffs[f"zero grad {k}"] = max(float(np.abs(gt).max()),
                                          float(np.abs(grads_j[k]).max())) / top
        else:
            diffs[f"grad {k}"] = _rel(grads_j[k], gt)
    if spec.batchnorm:
        new = convert.cnn_to_canonical({
            "params": jax.tree_util.tree_map(np.asarray, variables["params"]),
            "batch_stats": jax.tree_util.tree_map(np.asarray, stats_j)})
        for k, buf in net.state_dict().items():
            if k.endswith(("running_mean", "running_var")):
                diffs[f"bn stat {k}"] = _abs(new[k], buf.numpy())
    return diffs


def _augmentation_mismatches() -> float:
    """Pixels where JAX's on-device augmentation differs from the NumPy reference."""
    import jax.numpy as jnp
    from jax_port.steps import augment_device
    draws = _edge_draws(64)
    big, _ = _images(64, 3)
    aug_j = np.asarray(augment_device(jnp.asarray(big), jnp.asarray(draws.dy),
                                      jnp.asarray(draws.dx), jnp.asarray(draws.flip)))
    return float(np.sum(aug_j != augment(big, draws)))


def _augmented():
    from core.catalog import AUGMENTED_MODELS
    return AUGMENTED_MODELS


def _edge_draws(n: int) -> AugDraws:
    """Random crop offsets incl. both edges (0 and 8) and random flips."""
    g = np.random.default_rng(4)
    dy = g.integers(0, 9, n).astype(np.int32)
    dx = g.integers(0, 9, n).astype(np.int32)
    dy[:4], dx[:4] = [0, 8, 0, 8], [0, 0, 8, 8]
    return AugDraws(dy, dx, g.random(n) < 0.5)


# ------------------------------------------------------------------ torch device pipeline
def check_torch_device() -> dict:
    import torch
    from torch_cnn.pipeline import DevicePipeline, augment_torch, torchvision_loader

    from bench.speed.worker import _Split
    imgs, labels = _images(64, 5)
    draws = _edge_draws(64)
    aug_t = augment_torch(torch.from_numpy(imgs), torch.from_numpy(draws.dy),
                          torch.from_numpy(draws.dx), torch.from_numpy(draws.flip)).numpy()
    diffs = {"augmentation mismatched pixels": float(np.sum(aug_t != augment(imgs, draws)))}
    split = _Split(imgs, labels)
    dev = next(DevicePipeline(split, "cpu").batches(SEED, 1, 16, augment=False))
    tv = next(iter(torchvision_loader(split, SEED, 1, 16, augment=False)))
    diffs["pipelines (no augmentation) max |x diff|"] = _abs(dev[0].numpy(), tv[0].numpy())
    diffs["pipelines (no augmentation) label mismatches"] = float(np.sum(
        dev[1].numpy() != tv[1].numpy()))
    return _finish(diffs, {"augmentation": 0.0, "pipelines": 0.0})


# A CNN check "v3" uses the port's default convolution for this platform (im2col on CPU);
# "v3:xla" forces lax.conv (what the port uses on a GPU), still computed on this machine.
CHECKS = ("mlp2", "mlp4", "baseline", "dropout", "v3", "net4", "torch-device") + tuple(
    f"{m}:xla" for m in ("baseline", "dropout", "v3", "net4"))


def run_checks(names) -> dict:
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            if name in ("mlp2", "mlp4"):
                r = check_mlp(name)
            elif name == "torch-device":
                r = check_torch_device()
            else:
                model, _, impl = name.partition(":")
                r = check_cnn(model, impl or None)
        except Exception as e:  # noqa: BLE001 -- an import/API error is a failed check, reported
            r = {"passed": False, "error": f"{type(e).__name__}: {e}".splitlines()[0],
                 "summary": f"could not run: {type(e).__name__}: {e}".splitlines()[0]}
        r["seconds"] = time.perf_counter() - t0
        out[name] = r
        print(f"[bench] parity {name}: {'pass' if r['passed'] else 'FAIL'} -- {r['summary']}",
              file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speed.parity", description=__doc__.split("\n")[0])
    ap.add_argument("--checks", default="mlp4,v3,torch-device",
                    help=f"comma-separated from {','.join(CHECKS)}")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for bench.compare)")
    args = ap.parse_args(argv)
    names = [c for c in args.checks.split(",") if c]
    bad = [c for c in names if c not in CHECKS]
    if bad:
        print(f"error: unknown parity check {bad[0]!r} (choose from {', '.join(CHECKS)})",
              file=sys.stderr)
        return 2
    checks = run_checks(names)
    doc = {"checks": checks, "passed": all(c["passed"] for c in checks.values())}
    if args.json:
        from bench.speed.worker import RESULT_TAG
        print(RESULT_TAG + json.dumps(doc), flush=True)
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
