"""Train any of the five models with JAX: ``python -m jax_port.train --model mlp2|mlp4|baseline|dropout|v3``.

The shared flags and the run directory are ``core.driver``'s; the port's own flags are
``--conv-impl`` and ``--devices``. Runs on CPU, or on a GPU when JAX sees one, with no code
change.

Several devices: with more than one device of the chosen kind visible (or ``--devices
N``), training is data-parallel over a ``jax.sharding`` Mesh of them (``steps.py``): the
same global batches of the preset's size, split along the batch axis; ``--devices 1`` is
the single-device computation. Several hosts: set ``JAX_COORDINATOR_ADDRESS``
(host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on each host (or
start under SLURM / Open MPI, which JAX reads by itself) and run the same command on
every host; ``jax.distributed.initialize`` joins them and the Mesh spans every host's
devices. Process 0 alone writes the run directory.

Each family follows its spec's trajectory: the same batches (``epoch_order``), the same
augmentation draws (v3), the same learning-rate schedule. The spec stacks key their
per-epoch random streams differently -- numpy_mlp by the 0-based epoch, torch_cnn by the
1-based one -- and so does the port (``Trainer.rng_epoch_offset``). Dropout masks come
from JAX's RNG keyed by ``data.batching.dropout_rng`` (torch's own RNG cannot be
reproduced).

The recipe's ingredients (``--preset v3-recipe``, or ``--schedule``, ``--label-smoothing``,
``--ema-decay``, ``--tta``) follow torch_cnn's computation from the same per-step numbers
(``core.recipe.StepSchedule``); ``steps.py`` says how.

Resume state (``state.safetensors``, one atomic file, metadata ``epoch_completed``):
MLP: the weights under canonical names (as numpy_mlp; plain GD has no optimizer state).
CNN: as torch_cnn: ``model.<name>`` weights + ``adam.{exp_avg,exp_avg_sq,step}.<name>``
(optax's mu / nu / count, in torch layout) + ``ema.<name>`` (the moving average, when the
run keeps one), so the formats agree across the family.
"""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from core import flags
from data import run_cli
from core.catalog import AUGMENTED_MODELS, MODELS, family_of
from core.driver import NonFiniteLoss, Stack, train
from data.errors import UserError
from core.flags import check_fits_memory
from core.tensors import load_safetensors, save_safetensors

CONV_IMPLS = ("auto", "hybrid", "im2col", "xla")
# what starts a multi-host run (jax.distributed.initialize reads the first itself)
MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


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
    if "ema" in state:
        out.update({f"ema.{k}": a
                    for k, a in convert.to_canonical(jax_to_numpy(state["ema"])).items()})
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
            state = {**state, "opt": (adam,) + tuple(state["opt"][1:])}
            if trainer.ema:
                state["ema"] = jax.tree_util.tree_map(jnp.asarray, convert.cnn_from_canonical(
                    {k[len("ema."):]: a for k, a in tensors.items() if k.startswith("ema.")}))
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


# ------------------------------------------------------------------ the stack
class JaxPort(Stack):
    name = "jax_port"
    description = "Train a CIFAKE detector with JAX (MLP or CNN)."
    models = MODELS
    checks = {"conv_impl": flags.choice("--conv-impl", CONV_IMPLS),
              "devices": flags.optional(flags.devices)}
    # how many devices is where, not what (float rounding apart): a run may continue on
    # another number
    resume_flags = frozenset({"devices"})

    def add_flags(self, ap):
        ap.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto",
                        help="CNN convolution formulation: hybrid (CPU default: fast XLA:CPU "
                             "kernels, hand-written backward), im2col+matmul, or XLA's "
                             "convolution (GPU default)")
        ap.add_argument("--devices", type=flags.devices,
                        help="train data-parallel on the first N devices of the --device kind "
                             "(default: all JAX sees, as many as split the batch evenly; "
                             "the batch size must be divisible by N)")

    def processes(self):
        import os
        if not any(os.environ.get(k) for k in MULTIHOST_ENV):
            return 0, 1
        import jax

        def env_int(name):
            v = os.environ.get(name)
            try:
                return None if v is None else int(v)
            except ValueError:
                raise UserError(f"{name}={v!r}: not an integer") from None
        try:
            jax.distributed.initialize(num_processes=env_int("JAX_NUM_PROCESSES"),
                                       process_id=env_int("JAX_PROCESS_ID"))
        except ValueError as e:  # a missing or inconsistent variable
            raise UserError(f"jax.distributed.initialize: {e} (set JAX_COORDINATOR_ADDRESS, "
                            f"JAX_NUM_PROCESSES and JAX_PROCESS_ID)") from None
        return jax.process_index(), jax.process_count()

    def configure(self, cfg):
        from .model import layer_dims_for
        mlp = family_of(cfg["model"]) == "mlp"
        if mlp:
            cfg["layer_dims"] = list(layer_dims_for(cfg["model"], cfg["hidden"]))
            cfg["hidden"] = cfg["layer_dims"][1:-1]
            check_fits_memory(sum(a * b for a, b in zip(cfg["layer_dims"], cfg["layer_dims"][1:])),
                              np.dtype(cfg["dtype"]).itemsize, "--hidden")
        if mlp and cfg.get("conv_impl", "auto") != "auto":
            raise UserError(f"--conv-impl {cfg['conv_impl']} applies to the CNN models only")
        cfg.update(family="mlp" if mlp else "cnn", augment=cfg["model"] in AUGMENTED_MODELS,
                   optimizer="gd" if mlp else "adam")
        if not mlp:
            from .steps import ADAM_B1, ADAM_B2, ADAM_EPS
            cfg.update(adam_betas=[ADAM_B1, ADAM_B2], adam_eps=ADAM_EPS)

    def build(self, cfg, ds):
        import jax
        if cfg["dtype"] == "float64":
            jax.config.update("jax_enable_x64", True)  # before any array exists
        import jax.numpy as jnp

        from data.batching import num_batches
        from core.recipe import StepSchedule

        from .model import default_conv_impl, get_spec
        from .steps import Trainer, make_mesh
        self.cfg = cfg
        kind = flags.device(cfg["device"])
        try:
            devs = jax.devices() if kind == "auto" else jax.devices(kind)
        except RuntimeError:
            raise UserError(f"--device {kind}: JAX sees no {kind.upper()} here (backend "
                            f"{jax.default_backend()}); install jax with GPU support or use "
                            f"--device cpu") from None
        devs = devs[:self._device_count(cfg, len(devs), devs[0].platform)]
        # this process's first device (on several hosts the Mesh's first may be another's)
        dev = next(d for d in devs if d.process_index == jax.process_index())
        jax.config.update("jax_default_device", dev)  # every unsharded array goes there
        self.spec = spec = get_spec(cfg["model"], cfg.get("hidden"), cfg.get("dropout_p"))
        dtype = jnp.float64 if cfg["dtype"] == "float64" else jnp.float32
        conv_impl = (default_conv_impl(dev.platform) if cfg["conv_impl"] == "auto"
                     else cfg["conv_impl"])
        cnn = spec.family == "cnn"
        schedule = StepSchedule.from_config(cfg, num_batches(len(ds.train), cfg["batch_size"])) \
            if cnn else None
        self.trainer = Trainer(spec, lr=cfg["lr"], batch_size=cfg["batch_size"],
                               decay=cfg["decay"], augment=cfg["augment"], seed=cfg["seed"],
                               conv_impl=conv_impl, dtype=dtype,
                               rng_epoch_offset=1 if cnn else 0, schedule=schedule,
                               label_smoothing=cfg.get("label_smoothing") or 0.0,
                               tta=cfg.get("tta") or "none", mesh=make_mesh(devs))
        self.state = self.trainer.init_state(_init(spec, cfg["seed"], dtype))
        # the dataset lives on the device(s) as uint8 for the whole run
        evaluated = [s for s in (ds.val, ds.test) if s is not None]
        if self.trainer.mesh is None:
            self.train_x = jax.device_put(ds.train.images)
            self.train_y = jax.device_put(ds.train.labels)
            self.on_device = {id(ds.train): self.train_x,
                              **{id(s): jax.device_put(s.images) for s in evaluated}}
        else:  # a copy on every device; evaluation splits each split over them
            self.train_x = self.trainer.put(ds.train.images)
            self.train_y = self.trainer.put(ds.train.labels)
            self.on_device = {id(s): self.trainer.eval_set(s.images)
                              for s in (ds.train, *evaluated)}
        return {"device": f"{dev.platform}:{dev.id}", "device_kind": dev.device_kind,
                "n_devices": len(devs), "processes": jax.process_count(),
                "conv_impl_used": conv_impl if spec.family == "cnn" else None,
                "versions": versions()}

    def _device_count(self, cfg, visible: int, platform: str) -> int:
        """How many of the ``visible`` devices to train on: ``--devices N`` (refused when
        more than are visible, or when N does not divide the batch), else all of them, or
        the most that split the batch evenly."""
        import sys

        import jax
        bs, want = cfg["batch_size"], cfg.get("devices")
        if want is not None:
            if want > visible:
                raise UserError(f"--devices {want}: JAX sees {visible} {platform} device(s) "
                                f"here")
            if bs is not None and bs % want:
                raise UserError(f"--devices {want}: the batch of {bs} images does not split "
                                f"evenly over {want} devices; choose --devices dividing {bs} "
                                f"or a --batch-size divisible by {want}")
            n = want
        else:
            n = visible if bs is None else max(k for k in range(1, visible + 1) if bs % k == 0)
        if jax.process_count() > 1 and n != visible:
            raise UserError(f"--devices {n}: a run over {jax.process_count()} hosts trains on "
                            f"all {visible} devices they see; leave --devices out")
        if want is None and n < visible and jax.process_index() == 0:
            print(f"training on {n} of the {visible} {platform} devices JAX sees (a batch of "
                  f"{bs} images splits evenly over {n}; --devices chooses)", file=sys.stderr)
        return n

    def load(self, path):
        state, epoch = load_state(self.trainer, path, self.spec)
        self.state = self.trainer.place(state)
        return epoch

    def train_epoch(self, epoch, progress):
        from .steps import NonFiniteLoss as StepNonFinite
        try:
            self.state, row = self.trainer.run_epoch(
                self.state, self.train_x, self.train_y, epoch,
                lambda done, loss, correct: progress(done, loss))
        except StepNonFinite as e:
            raise NonFiniteLoss(e.step, e.loss) from None
        return row

    def compile(self, epoch):
        self.trainer.compile_epoch(self.state, self.train_x, self.train_y, epoch)

    def set_train_images(self, images):
        # the split's own copy stays for evaluation; several devices: a copy on each
        if self.trainer.mesh is not None:
            self.train_x = self.trainer.put(images)
            return
        import jax
        self.train_x = jax.device_put(images)

    def logits(self, split):
        images = self.on_device.get(id(split), split.images)
        return self.trainer.logits(self.trainer.final_variables(self.state), images)

    def save_state(self, path, epoch):
        from . import checkpoint
        meta = {"epoch_completed": str(epoch)}
        if self.trainer.tx is None:  # MLP: the weights are the whole state (as numpy_mlp)
            checkpoint.save(path, self.spec, self.state["variables"], meta)
        else:
            save_safetensors(path, state_tensors(self.trainer, self.state),
                             {"family": "cnn", "model": self.spec.name, **meta})

    def save_model(self, path):
        from . import checkpoint
        checkpoint.save(path, self.spec, self.trainer.final_variables(self.state))


def main(argv: list[str] | None = None) -> int:
    return train(JaxPort(), argv)


if __name__ == "__main__":
    run_cli(main, prog="jax_port.train")
