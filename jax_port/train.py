"""Train any of the six models with JAX: ``python -m jax_port.train --model MODEL``
(mlp2|mlp4|baseline|dropout|v3|net4).

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
1-based one -- and so does the port (``EpochRunner``'s ``rng_epoch_offset``). Dropout masks come
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

import os
import platform
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from core import flags
from core.architecture import cnn_tensors
from core.catalog import AUGMENTED_MODELS, MODELS, family_of
from core.driver import Stack, train
from core.flags import check_fits_memory
from core.recipe import StepSchedule
from core.tensors import load_safetensors, save_safetensors
from data import run_cli
from data.batching import num_batches
from data.errors import UserError

from . import checkpoint, convert
from . import steps as S
from .checkpoint import jax_to_numpy
from . import CONV_IMPLS
from .model import default_conv_impl, get_spec, init_variables, layer_dims_for
from .steps import EpochRunner, StepConfig, TrainState, final_variables, init_state

CONV_CHOICES = ("auto", *CONV_IMPLS)
# what starts a multi-host run (jax.distributed.initialize reads the first itself)
MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def versions() -> dict:
    return {"python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}


# ------------------------------------------------------------------ resume state
def state_tensors(state: TrainState) -> dict[str, np.ndarray]:
    """What --resume needs beyond model.safetensors, in the spec stacks' format."""
    v = jax_to_numpy(state.variables)
    if not isinstance(state.opt, optax.ScaleByAdamState):  # MLP: the weights are all (numpy_mlp)
        return convert.to_canonical(v)
    out = {f"model.{k}": a for k, a in convert.to_canonical(v).items()}
    if state.ema is not None:
        out.update({f"ema.{k}": a
                    for k, a in convert.to_canonical(jax_to_numpy(state.ema)).items()})
    adam = jax_to_numpy(state.opt)
    step = np.asarray(adam.count, np.float32)  # torch keeps Adam's step as a float32 tensor
    for key, tree in (("exp_avg", adam.mu), ("exp_avg_sq", adam.nu)):
        for name, a in convert.cnn_params_to_canonical(tree).items():
            out[f"adam.{key}.{name}"] = a
            out[f"adam.step.{name}"] = step
    return out


def load_state(cfg: StepConfig, path: Path) -> tuple[TrainState, int]:
    """-> (the resumed state, epoch_completed) from state.safetensors."""
    spec = cfg.spec
    tensors, meta = load_safetensors(path)
    try:
        start = int(meta["epoch_completed"])
    except (KeyError, ValueError):
        raise UserError(f"{path}: metadata 'epoch_completed' missing") from None

    def part(prefix):
        return {k[len(prefix):]: a for k, a in tensors.items() if k.startswith(prefix)}
    try:
        if spec.family == "mlp":
            state = init_state(cfg, convert.from_canonical(tensors))
        else:
            state = init_state(cfg, convert.cnn_from_canonical(part("model.")))
            last = list(cnn_tensors(spec.name))[-1]  # every parameter holds the same step
            adam = state.opt._replace(
                count=jnp.asarray(int(tensors[f"adam.step.{last}"]), state.opt.count.dtype),
                mu=jax.tree_util.tree_map(jnp.asarray,
                                          convert.cnn_params_from_canonical(part("adam.exp_avg."))),
                nu=jax.tree_util.tree_map(jnp.asarray, convert.cnn_params_from_canonical(
                    part("adam.exp_avg_sq."))))
            ema = jax.tree_util.tree_map(jnp.asarray, convert.cnn_from_canonical(part("ema."))) \
                if cfg.ema else None
            state = TrainState(state.variables, adam, ema)
    except KeyError as e:
        raise UserError(f"{path}: tensor {e} missing (not a {spec.name} run?)") from None
    # shapes must match a fresh model's
    fresh = init_state(cfg, init_variables(spec, 0, cfg.dtype))
    if jax.tree_util.tree_map(np.shape, state) != jax.tree_util.tree_map(np.shape, fresh):
        raise UserError(f"{path}: tensors do not fit model {spec.name}")
    return state, start


# ------------------------------------------------------------------ the stack
class JaxPort(Stack):
    name = "jax_port"
    description = "Train a CIFAKE detector with JAX (MLP or CNN)."
    models = MODELS
    checks = {"conv_impl": flags.choice("--conv-impl", CONV_CHOICES),
              "devices": flags.optional(flags.devices)}
    # how many devices is where, not what (float rounding apart): a run may continue on
    # another number
    resume_flags = frozenset({"devices"})

    def add_flags(self, ap):
        ap.add_argument("--conv-impl", choices=CONV_CHOICES, default="auto",
                        help="CNN convolution formulation: hybrid (CPU default: fast XLA:CPU "
                             "kernels, hand-written backward), im2col+matmul, or XLA's "
                             "convolution (GPU default)")
        ap.add_argument("--devices", type=flags.devices,
                        help="train data-parallel on the first N devices of the --device kind "
                             "(default: all JAX sees, as many as split the batch evenly; "
                             "the batch size must be divisible by N)")

    def processes(self):
        if not any(os.environ.get(k) for k in MULTIHOST_ENV):
            return 0, 1

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
            cfg.update(adam_betas=[S.ADAM_B1, S.ADAM_B2], adam_eps=S.ADAM_EPS)

    def build(self, cfg, ds):
        if cfg["dtype"] == "float64":
            jax.config.update("jax_enable_x64", True)  # before any array exists
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
        spec = get_spec(cfg["model"], cfg.get("hidden"), cfg.get("dropout_p"))
        cnn = spec.family == "cnn"
        schedule = StepSchedule.from_config(cfg, num_batches(len(ds.train), cfg["batch_size"]))
        self.step_cfg = StepConfig.of(
            spec, conv_impl=(default_conv_impl(dev.platform) if cfg["conv_impl"] == "auto"
                             else cfg["conv_impl"]),
            dtype=jnp.float64 if cfg["dtype"] == "float64" else jnp.float32,
            augment=cfg["augment"], ema=bool(schedule.ema),
            label_smoothing=cfg.get("label_smoothing") or 0.0, tta=cfg.get("tta") or "none",
            mesh=S.make_mesh(devs))
        self.runner = EpochRunner(self.step_cfg, batch_size=cfg["batch_size"], seed=cfg["seed"],
                                  schedule=schedule, decay=cfg["decay"],
                                  rng_epoch_offset=1 if cnn else 0)
        self.state = init_state(self.step_cfg, init_variables(spec, cfg["seed"],
                                                              self.step_cfg.dtype))
        self._put_data(ds)
        return {"device": f"{dev.platform}:{dev.id}", "device_kind": dev.device_kind,
                "n_devices": len(devs), "processes": jax.process_count(),
                "conv_impl_used": self.step_cfg.conv_impl if cnn else None,
                "versions": versions()}

    def _put_data(self, ds):
        """The dataset lives on the device(s) as uint8 for the whole run: the training
        split for the steps; on several devices a copy on each, and every evaluated split
        laid out over them."""
        c = self.step_cfg
        evaluated = [s for s in (ds.val, ds.test) if s is not None]
        self.train_x, self.train_y = S.put(c, ds.train.images), S.put(c, ds.train.labels)
        if c.mesh is None:
            self.on_device = {id(ds.train): self.train_x,
                              **{id(s): jax.device_put(s.images) for s in evaluated}}
        else:
            self.on_device = {id(s): S.eval_set(c, s.images) for s in (ds.train, *evaluated)}

    def _device_count(self, cfg, visible: int, platform: str) -> int:
        """How many of the ``visible`` devices to train on: ``--devices N`` (refused when
        more than are visible, or when N does not divide the batch), else all of them, or
        the most that split the batch evenly."""
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
        state, epoch = load_state(self.step_cfg, path)
        self.state = S.place(self.step_cfg, state)
        return epoch

    def train_epoch(self, epoch, progress):
        self.state, row = self.runner.run_epoch(self.state, self.train_x, self.train_y, epoch,
                                                lambda done, loss, correct: progress(done, loss))
        return row

    def compile(self, epoch):
        self.runner.compile_epoch(self.state, self.train_x, self.train_y, epoch)

    def set_train_images(self, images):
        # the split's own copy stays for evaluation; several devices: a copy on each
        self.train_x = S.put(self.step_cfg, images)

    def logits(self, split):
        images = self.on_device.get(id(split), split.images)
        return S.logits(self.step_cfg, final_variables(self.state), images)

    def save_state(self, path, epoch):
        meta = {"epoch_completed": str(epoch)}
        if self.step_cfg.spec.family == "mlp":  # the weights are the whole state (as numpy_mlp)
            checkpoint.save(path, self.step_cfg.spec, self.state.variables, meta)
        else:
            save_safetensors(path, state_tensors(self.state),
                             {"family": "cnn", "model": self.step_cfg.spec.name, **meta})

    def save_model(self, path):
        checkpoint.save(path, self.step_cfg.spec, final_variables(self.state))


def main(argv: list[str] | None = None) -> int:
    return train(JaxPort(), argv)


if __name__ == "__main__":
    run_cli(main, prog="jax_port.train")
