"""Train any of the five models with JAX: ``python -m jax_port.train --model mlp2|mlp4|baseline|dropout|v3``.

Shared flags (data.runs.common_parser, --decay for the MLPs) plus ``--model``, ``--hidden``
(MLPs), ``--dtype`` (MLPs: float32 | float64), ``--eval-every``, ``--conv-impl``. Runs on
CPU, or on a GPU when JAX sees one, with no code change. Writes the run directory of the
contract (config.json, metrics.json, model.safetensors, state.safetensors, state.json).

Each family follows its spec's trajectory: the same batches (``epoch_order``), the same
augmentation draws (v3), the same learning-rate schedule. The spec stacks key their
per-epoch random streams differently -- numpy_mlp by the 0-based epoch, torch_cnn by the
1-based one -- and so does the port (``Trainer.rng_epoch_offset``). Dropout masks come
from JAX's RNG keyed by ``rng(seed, 3, epoch)`` (torch's own RNG cannot be reproduced).

Resume state (``state.safetensors``, one atomic file, metadata ``epoch_completed``):
MLP: the weights under canonical names (as numpy_mlp; plain GD has no optimizer state).
CNN: as torch_cnn: ``model.<name>`` weights + ``adam.{exp_avg,exp_avg_sq,step}.<name>``
(optax's mu / nu / count, in torch layout), so the formats agree across the family.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from data import load_cifake, run_cli
from data.errors import UserError
from data.init import INIT_SCHEME
from data.runs import (atomic_write_json, check_init_scheme, classification_report, common_parser,
                       load_safetensors, positive_int, prepare_out_dir, read_json, resolve_config)

from .presets import AUGMENTED_MODELS, CNN_DEFAULTS, MLP_DEFAULTS, PRESETS

PROG = "jax_port.train"
STACK = "jax_port"
MODELS = ("mlp2", "mlp4", "baseline", "dropout", "v3")
CONV_IMPLS = ("auto", "hybrid", "im2col", "xla")
# flags that may differ between a run and its --resume (they do not change the results)
_RESUME_FREE = {"epochs", "no_progress", "resume", "out", "cache_dir", "data", "preset"}


def build_parser() -> argparse.ArgumentParser:
    ap = common_parser(PROG, "Train a CIFAKE detector with JAX (MLP or CNN).", PRESETS, decay=True)
    ap.add_argument("--model", choices=MODELS, help="network (or take it from --preset)")
    ap.add_argument("--hidden", type=str, help="MLP hidden sizes, comma-separated "
                    "(mlp2: one, e.g. 7; mlp4: three, e.g. 20,7,5)")
    ap.add_argument("--dtype", choices=("float32", "float64"),
                    help="MLP float type (default float32); the CNNs are float32")
    ap.add_argument("--eval-every", type=positive_int("--eval-every"),
                    help="evaluate the test set every K epochs (default: the preset's, else 1)")
    ap.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto",
                    help="CNN convolution formulation: hybrid (CPU default: fast XLA:CPU "
                         "kernels, hand-written backward), im2col+matmul, or XLA's "
                         "convolution (GPU default)")
    return ap


def _explicit(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def parse_hidden(s) -> list[int] | None:
    if s is None or isinstance(s, list):
        return s
    try:
        sizes = [int(t) for t in str(s).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--hidden must be comma-separated integers like 20,7,5, got {s!r}") from None
    if not sizes or any(h <= 0 for h in sizes):
        raise UserError(f"--hidden sizes must be positive integers, got {s!r}")
    return sizes


def resolve(args, argv: list[str]) -> dict:
    from .model import MLP_HIDDEN, layer_dims_for
    model = args.model or (PRESETS[args.preset]["model"] if args.preset else None)
    if model is None:
        raise UserError("give --model (mlp2, mlp4, baseline, dropout, v3) or --preset")
    if args.preset and args.model and PRESETS[args.preset]["model"] != args.model:
        raise UserError(f"--model {args.model} contradicts --preset {args.preset} "
                        f"(a {PRESETS[args.preset]['model']} preset)")
    mlp = model in MLP_HIDDEN
    defaults = dict(MLP_DEFAULTS if mlp else CNN_DEFAULTS, model=model, preset=None, seed=0,
                    hidden=None, subset=None, data=None)
    cfg = resolve_config(args, PRESETS, defaults)
    if args.batch_size is None and _explicit(argv, "--batch-size"):
        cfg["batch_size"] = None  # '--batch-size full'
    if not mlp:
        for flag, val in (("--decay", args.decay), ("--hidden", args.hidden)):
            if val:
                raise UserError(f"{flag} applies to the MLP models only")
        if cfg["dtype"] != "float32":
            raise UserError("--dtype float64 applies to the MLP models only")
        if cfg["batch_size"] is None:
            raise UserError("--batch-size full applies to the MLP models only")
    hidden = parse_hidden(cfg.get("hidden"))
    if mlp:
        want = len(MLP_HIDDEN[model])
        if hidden is not None and len(hidden) != want:
            raise UserError(f"--hidden: {model} has {want} hidden layer(s), got {hidden}")
        cfg["layer_dims"] = list(layer_dims_for(model, hidden))
        cfg["hidden"] = cfg["layer_dims"][1:-1]
    cfg.update(stack=STACK, family="mlp" if mlp else "cnn", augment=model in AUGMENTED_MODELS,
               init=INIT_SCHEME,
               optimizer="gd" if mlp else "adam", conv_impl=args.conv_impl)
    if not mlp:
        from .steps import ADAM_B1, ADAM_B2, ADAM_EPS
        cfg.update(adam_betas=[ADAM_B1, ADAM_B2], adam_eps=ADAM_EPS)
    return cfg


def _resume_config(args, argv, out: Path) -> dict:
    cfg = read_json(out / "config.json")
    check_init_scheme(cfg, out / "config.json")
    if args.model is None and args.preset is None:
        args.model = cfg.get("model")  # plain `--out RUN --resume`: the run's own model
    fresh = resolve(args, argv)
    for k, v in fresh.items():
        flag = "--" + k.replace("_", "-")
        if k in _RESUME_FREE or not _explicit(argv, flag):
            continue
        if cfg.get(k) != v:
            raise UserError(f"--resume: {flag} {v} differs from the run's {cfg.get(k)} "
                            f"({out / 'config.json'}); only --epochs may change")
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    return cfg


def versions() -> dict:
    import flax
    import jax
    import optax
    return {"python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}


# ------------------------------------------------------------------ resume state
def state_tensors(trainer, state) -> dict[str, np.ndarray]:
    """What --resume needs beyond model.safetensors, in the spec stacks' format."""
    from . import convert
    from .checkpoint import jax_to_numpy
    v = jax_to_numpy(state["variables"])
    if trainer.tx is None:
        return convert.to_canonical(v)
    out = {f"model.{k}": a for k, a in convert.to_canonical(v).items()}
    adam = jax_to_numpy(state["opt"][0])
    step = np.asarray(adam.count, np.float32)  # torch keeps Adam's step as a float32 tensor
    for key, tree in (("exp_avg", adam.mu), ("exp_avg_sq", adam.nu)):
        for name, a in convert.cnn_params_to_canonical(tree).items():
            out[f"adam.{key}.{name}"] = a
            out[f"adam.step.{name}"] = step
    return out


def load_state(trainer, path: Path, spec) -> tuple[dict, int]:
    """-> (trainer state, epoch_completed) from state.safetensors."""
    import jax.numpy as jnp

    from . import convert
    tensors, meta = load_safetensors(path)
    try:
        start = int(meta["epoch_completed"])
    except (KeyError, ValueError):
        raise UserError(f"{path}: metadata 'epoch_completed' missing") from None
    try:
        if trainer.tx is None:
            variables = convert.from_canonical(tensors)
            state = trainer.init_state(variables)
        else:
            weights = {k[len("model."):]: a for k, a in tensors.items() if k.startswith("model.")}
            state = trainer.init_state(convert.cnn_from_canonical(weights))
            adam = state["opt"][0]
            mu = convert.cnn_params_from_canonical(
                {k[len("adam.exp_avg."):]: a for k, a in tensors.items() if k.startswith("adam.exp_avg.")})
            nu = convert.cnn_params_from_canonical(
                {k[len("adam.exp_avg_sq."):]: a for k, a in tensors.items()
                 if k.startswith("adam.exp_avg_sq.")})
            count = int(tensors["adam.step.fc2.bias"])
            import jax
            adam = adam._replace(count=jnp.asarray(count, adam.count.dtype),
                                 mu=jax.tree_util.tree_map(jnp.asarray, mu),
                                 nu=jax.tree_util.tree_map(jnp.asarray, nu))
            state = {"variables": state["variables"], "opt": (adam,) + tuple(state["opt"][1:])}
    except KeyError as e:
        raise UserError(f"{path}: tensor {e} missing (not a {spec.name} run?)") from None
    # shapes must match a fresh model's
    import jax
    fresh = trainer.init_state(_init(spec, 0, trainer.dtype))
    got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), state)
    want = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), fresh)
    if got != want:
        raise UserError(f"{path}: tensors do not fit model {spec.name}")
    return state, start


def _init(spec, seed, dtype):
    from .model import init_variables
    return init_variables(spec, seed, dtype)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    t_start = time.time()
    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        out = prepare_out_dir(args.out, resume=True)
        cfg = _resume_config(args, argv, out)
    else:
        cfg = resolve(args, argv)
        out = Path(args.out or f"runs/{STACK}-{cfg['preset'] or cfg['model']}")

    import jax
    if cfg["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)  # before any array exists
    import jax.numpy as jnp

    from . import checkpoint
    from .model import default_conv_impl, get_spec
    from .steps import NonFiniteLoss, Trainer

    spec = get_spec(cfg["model"], cfg.get("hidden"))
    dtype = jnp.float64 if cfg["dtype"] == "float64" else jnp.float32
    conv_impl = default_conv_impl() if cfg["conv_impl"] == "auto" else cfg["conv_impl"]

    # a run trained with --cache-dir resumes from the same cache unless told otherwise
    cfg["cache_dir"] = args.cache_dir or (cfg.get("cache_dir") if args.resume else None)
    ds = load_cifake(args.data or cfg.get("data"), cfg["cache_dir"], subset=cfg["subset"],
                     verbose=not args.no_progress)
    dev = jax.devices()[0]
    cfg.update(device=f"{dev.platform}:{dev.id}", device_kind=dev.device_kind,
               conv_impl_used=conv_impl if spec.family == "cnn" else None)
    if not args.resume:
        out = prepare_out_dir(out, resume=False)
        cfg["data"] = ds.manifest.get("source", {}).get("path", cfg["data"])
        cfg["n_train"], cfg["n_test"] = len(ds.train), len(ds.test)
        cfg["versions"] = versions()
        atomic_write_json(out / "config.json", cfg)

    trainer = Trainer(spec, lr=cfg["lr"], batch_size=cfg["batch_size"], decay=cfg["decay"],
                      augment=cfg["augment"], seed=int(cfg["seed"]), conv_impl=conv_impl,
                      dtype=dtype, rng_epoch_offset=0 if spec.family == "mlp" else 1)
    history, start, prior_wall = [], 0, 0.0
    if args.resume:
        state, start = load_state(trainer, out / "state.safetensors", spec)
        if (out / "metrics.json").exists():
            old = read_json(out / "metrics.json")
            prior_wall = float(old.get("wall_seconds", 0.0))
            history = [h for h in old.get("history", []) if h["epoch"] <= start]
        print(f"resuming {out} after epoch {start}", file=sys.stderr)
    else:
        state = trainer.init_state(_init(spec, int(cfg["seed"]), dtype))

    # The dataset lives on the device as uint8 for the whole run.
    train_x, train_y = jax.device_put(ds.train.images), jax.device_put(ds.train.labels)
    test_x = jax.device_put(ds.test.images)
    n, epochs = len(ds.train), int(cfg["epochs"])
    from tqdm import tqdm

    def write_metrics(final=None, complete=False):
        atomic_write_json(out / "metrics.json", {
            "history": history, "final": final, "complete": complete,
            "wall_seconds": prior_wall + time.time() - t_start})

    epoch = start
    try:
        for epoch in range(start, epochs):
            bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr,
                       disable=args.no_progress, leave=False, dynamic_ncols=True, unit="img")
            t0 = time.perf_counter()

            def on_chunk(done, loss, correct):
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * correct / max(done, 1):.2f}",
                                img_s=f"{done / (time.perf_counter() - t0):.0f}", refresh=False)
            try:
                state, row = trainer.run_epoch(state, train_x, train_y, epoch, on_chunk)
            except NonFiniteLoss as e:
                raise UserError(f"non-finite training loss ({e.loss}) at epoch {e.epoch + 1}, "
                                f"step {e.step}; the last good checkpoint (epoch {epoch}) is "
                                f"kept in {out}; try a smaller --lr") from None
            finally:
                bar.close()
            row = {"epoch": epoch + 1, **row}
            if (epoch + 1) % int(cfg["eval_every"]) == 0 or epoch + 1 == epochs:
                rep = classification_report(trainer.logits(state["variables"], test_x),
                                            ds.test.labels)
                row.update(test_loss=rep["loss"], test_acc=rep["accuracy"])
                if not args.no_progress:
                    print(f"epoch {epoch + 1}/{epochs}: lr {row['lr']:.4g} train loss "
                          f"{row['train_loss']:.4f} acc {row['train_acc']:.2f}% | test loss "
                          f"{rep['loss']:.4f} acc {rep['accuracy']:.2f}% | "
                          f"{row['images_per_s']:.0f} img/s", file=sys.stderr)
            history.append(row)
            # Kill-safety order (as torch_cnn): history, resume point, weights, state.json.
            write_metrics()
            if trainer.tx is None:  # MLP: the weights are the whole state (as numpy_mlp)
                checkpoint.save(out / "state.safetensors", spec, state["variables"],
                                {"epoch_completed": str(epoch + 1)})
            else:
                _save_cnn_state(out / "state.safetensors", spec, trainer, state, epoch + 1)
            checkpoint.save(out / "model.safetensors", spec, state["variables"])
            atomic_write_json(out / "state.json", {"epoch_completed": epoch + 1,
                                                   "model": spec.name, "seed": cfg["seed"]})
    except KeyboardInterrupt:
        print(f"interrupted during epoch {epoch + 1}; epoch {len(history)} is saved in {out}; "
              f"resume with: python -m {PROG} --out {out} --resume", file=sys.stderr)
        return 130

    v = state["variables"]
    dedup = ds.test_deduplicated()
    final = {"train": classification_report(trainer.logits(v, train_x), ds.train.labels),
             "test": classification_report(trainer.logits(v, test_x), ds.test.labels),
             "test_dedup": classification_report(trainer.logits(v, dedup.images), dedup.labels)}
    final.update(train_acc=final["train"]["accuracy"], test_acc=final["test"]["accuracy"],
                 gap_pp=final["train"]["accuracy"] - final["test"]["accuracy"],
                 test_loss=final["test"]["loss"], test_auc=final["test"]["roc_auc"])
    write_metrics(final, complete=True)
    if not args.no_progress:
        print(f"done: train {final['train_acc']:.2f}% test {final['test_acc']:.2f}% "
              f"(gap {final['gap_pp']:.2f} pp, test AUC {final['test_auc']}, dedup test "
              f"{final['test_dedup']['accuracy']:.2f}%) -> {out}", file=sys.stderr)
    return 0


def _save_cnn_state(path, spec, trainer, state, epoch_completed: int) -> None:
    from data.runs import save_safetensors
    save_safetensors(path, state_tensors(trainer, state),
                     {"family": "cnn", "model": spec.name, "epoch_completed": str(epoch_completed)})


if __name__ == "__main__":
    run_cli(main, prog=PROG)
