"""The five backends behind one interface, built only on each stack's public API.

A backend trains and evaluates ONE model on ONE device:

    b = make_backend(name, model, device, seed, n_devices)  # imports its stack lazily
    h = b.put(split)                           # the split as this backend feeds it
    b.init(seed, weights=None)                 # fresh weights + optimizer state; ``weights``:
                                               # canonical tensors (the spec's init) to start from
    b.train_epoch(h, epoch)                    # one pass over h; returns once the device is idle
    b.logits(h)                                # eval-mode logits (N,), on the host

``train_epoch`` and ``logits`` return only after the work is finished on the device
(torch: ``torch.cuda.synchronize()``; JAX: ``jax.block_until_ready`` inside
``EpochRunner.run_epoch`` / host copies in ``steps.logits``), so the caller may read
the clock right after them.

Hyperparameters are the specs' presets, identical for every backend of a family:
MLPs the mini-batch preset of numpy_mlp (``<model>-mini``: lr0, decay, batch size),
CNNs torch_cnn's preset of the model (Adam lr, batch size; augmentation for v3).

Several devices (``n_devices`` > 1, backends with ``parallel``): the JAX backends train
data-parallel over a Mesh of the first N devices (jax_port.steps); torch-device with
DistributedDataParallel, one process per GPU, so its worker runs under torchrun
(torch_cnn.distributed). The batches, hyperparameters and function are the 1-device ones.

This module imports neither torch nor jax at import time: ``compare`` validates names
against ``BACKENDS`` without paying for them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from data.batching import epoch_order
from core.catalog import AUGMENTED_MODELS, PRESETS, family_of
from core.recipe import StepSchedule

DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class BackendInfo:
    name: str
    family: str          # "mlp" | "cnn"
    stack: str           # the package that implements it
    description: str
    gpu: str | None      # which library must see a GPU for device "gpu" ("torch" | "jax" | None)
    jit: bool = False    # the first pass compiles (reported as compile_s, not warmup_s)
    parallel: bool = False  # can train data-parallel on several devices of a kind


BACKENDS = {
    "numpy-mlp": BackendInfo("numpy-mlp", "mlp", "numpy_mlp",
                             "NumPy MLP (the MLP spec): hand-written backprop, float32, BLAS", None),
    "jax-mlp": BackendInfo("jax-mlp", "mlp", "jax_port",
                           "JAX MLP: jit-compiled lax.scan epochs, data resident on the device", "jax",
                           jit=True, parallel=True),
    "torch-torchvision": BackendInfo("torch-torchvision", "cnn", "torch_cnn",
                                     "torch CNN (the CNN spec) fed by the original torchvision "
                                     "DataLoader pipeline (PIL + per-sample transforms)", "torch"),
    "torch-device": BackendInfo("torch-device", "cnn", "torch_cnn",
                                "torch CNN fed by the device pipeline (uint8 on the device, "
                                "batched and augmented there)", "torch", parallel=True),
    # torch as a user tuning it for speed would run it (the spec keeps NCHW and
    # foreach=False Adam for its arithmetic guarantees): the device pipeline plus
    "torch-device-cl": BackendInfo("torch-device-cl", "cnn", "torch_cnn",
                                   "torch-device + channels_last tensors and torch's default "
                                   "(foreach) Adam", "torch"),
    "torch-device-fused": BackendInfo("torch-device-fused", "cnn", "torch_cnn",
                                      "torch-device + channels_last and fused=True Adam", "torch"),
    "torch-compile": BackendInfo("torch-compile", "cnn", "torch_cnn",
                                 "torch-device-cl with the model under torch.compile "
                                 "(inductor; first pass = compilation)", "torch", jit=True),
    "jax-cnn": BackendInfo("jax-cnn", "cnn", "jax_port",
                           "JAX CNN: jit-compiled lax.scan epochs; on CPU hybrid convs "
                           "(lax.conv forward, hand-written backward)", "jax", jit=True,
                           parallel=True),
}
# The reference each ratio is taken against, per family (measured in the same run).
REFERENCE = {"mlp": "numpy-mlp", "cnn": "torch-torchvision"}
# Every torch row: the JAX CNN's headline ratio is taken against the fastest of them.
TORCH_CNN_BACKENDS = tuple(k for k, v in BACKENDS.items() if v.stack == "torch_cnn")


def hyperparameters(model: str) -> dict:
    """The spec preset's training hyperparameters for ``model`` (same for every backend)."""
    if family_of(model) == "mlp":
        p = PRESETS[f"{model}-mini"]
        return {"preset": f"{model}-mini", "batch_size": p["batch_size"], "lr": p["lr"],
                "decay": p["decay"], "optimizer": "gradient descent, lr0 / (1 + decay * epoch)",
                "augment": False}
    p = PRESETS[model]
    optimizer = "Adam (0.9, 0.999, eps 1e-8), constant lr"
    if p.get("schedule", "constant") != "constant" or p.get("ema_decay"):
        # net4's preset trains with a one-cycle lr and a weight average: the bench times
        # the network's step at the schedule's peak lr, without the average's update
        optimizer += " (the preset's peak; its lr schedule and weight average not timed)"
    return {"preset": model, "batch_size": p["batch_size"], "lr": p["lr"], "decay": 0.0,
            "optimizer": optimizer, "augment": model in AUGMENTED_MODELS}


def full_batch_hyperparameters(model: str) -> dict:
    """The full-batch preset of an MLP (``<model>-full``): what the bench's full-batch epoch
    figure trains with."""
    p = PRESETS[f"{model}-full"]
    return {"preset": f"{model}-full", "lr": p["lr"], "decay": p["decay"]}


class Backend:
    name = ""
    jit = False  # set from BackendInfo.jit by make_backend
    parallel = False  # the class trains on several devices (``n_devices`` > 1)

    def __init__(self, model: str, device: str, seed: int = 0, n_devices: int = 1):
        if n_devices > 1 and not self.parallel:
            raise ValueError(f"{type(self).__name__} trains on one device")
        self.model, self.device, self.seed, self.n_devices = model, device, seed, n_devices
        self.hp = hyperparameters(model)

    def set_seed(self, seed: int) -> None:
        """Train the next runs with ``seed``'s batch order, augmentation and dropout draws."""
        self.seed = seed

    def device_name(self) -> str:
        return "cpu"

    def peak_device_bytes(self) -> int | None:
        """Peak accelerator memory allocated by this process (None on CPU)."""
        return None

    def notes(self) -> list[str]:
        return []


def spec_init_weights(model: str, seed: int) -> dict[str, np.ndarray]:
    """The SPEC stack's initial weights for ``seed`` under the canonical names (numpy_mlp's
    He init for MLPs, the CNNs' seeded init that torch_cnn loads). The accuracy budget starts
    every backend of a family from these, so its rows differ only by the engine (and by the
    augmentation / dropout draws, which each pipeline makes its own way)."""
    if family_of(model) == "mlp":
        from numpy_mlp import model as nm
        return nm.init_params(nm.layer_dims_for(model), seed, np.float32)
    from core.init import cnn_init  # the arrays torch_cnn.model.init_model loads
    return cnn_init(model, seed)


# ------------------------------------------------------------------ NumPy MLP
class NumpyMLP(Backend):
    name = "numpy-mlp"

    def __init__(self, model, device, seed=0, n_devices=1):
        super().__init__(model, device, seed, n_devices)
        if device != "cpu":
            raise ValueError("numpy-mlp runs on the CPU only")
        from numpy_mlp import model as nm
        from numpy_mlp import train as nt
        self.nm, self.nt = nm, nt
        self.dims = nm.layer_dims_for(model)

    def put(self, split):
        # uint8 columns (3072, n): a transposed view of the NHWC array, no float copy;
        # numpy_mlp.train.train_epoch scales each batch to float32 on the fly.
        return split.images.reshape(len(split), -1).T, split.labels.reshape(1, -1), len(split)

    def init(self, seed, weights=None):
        self.params = (self.nm.init_params(self.dims, seed, np.float32) if weights is None else
                       {k: np.asarray(v, np.float32) for k, v in weights.items()})

    def train_epoch(self, h, epoch):
        X, Y, n = h
        lr = self.nm.lr_at(self.hp["lr"], self.hp["decay"], epoch)
        self.params, loss, acc = self.nt.train_epoch(self.params, X, Y, epoch_order(
            self.seed, epoch, n), self.hp["batch_size"], lr)
        return {"loss": float(loss), "acc": float(acc)}

    def logits(self, h):
        return self.nm.predict_logits(h[0], self.params)

    def put_full_batch(self, split):
        # full-batch training scales the whole split to floats once (numpy_mlp.train's
        # build), so every epoch is two passes of BLAS over a (3072, n) float matrix
        return (self.nm.images_to_X(split.images, np.float32), split.labels.reshape(1, -1),
                len(split))

    def full_batch_epoch(self, h, epoch):
        X, Y, _ = h
        p = full_batch_hyperparameters(self.model)
        self.params, loss, acc = self.nt.train_epoch(self.params, X, Y, None, None,
                                                     self.nm.lr_at(p["lr"], p["decay"], epoch))
        return {"loss": float(loss), "acc": float(acc)}


# ------------------------------------------------------------------ torch CNN
class TorchCNN(Backend):
    pipeline = ""

    def __init__(self, model, device, seed=0, n_devices=1):
        super().__init__(model, device, seed, n_devices)
        import torch
        from torch_cnn import model as tm
        from torch_cnn import train as tt
        from torch_cnn.pipeline import flush_denormals
        flush_denormals()  # as torch_cnn.train does, before this worker's first torch operation
        self.torch, self.tm, self.tt = torch, tm, tt
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        self.dev = torch.device("cuda" if device == "gpu" else "cpu")
        self.rank, self.world, self.ddp = 0, 1, None
        if n_devices > 1:  # one process per device, started by torchrun
            from torch_cnn import distributed
            self.dist = distributed
            self.rank, self.world, local = distributed.world()
            if self.world != n_devices:
                raise RuntimeError(f"{n_devices} devices need {n_devices} processes (torchrun "
                                   f"--nproc-per-node {n_devices}); this is one of {self.world}")
            self.dev = distributed.start(self.dev, local)

    def device_name(self):
        name = self.torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu"
        return name if self.world == 1 else f"{self.world} x {name}"

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def peak_device_bytes(self):
        if self.dev.type == "cuda":
            return int(self.torch.cuda.max_memory_allocated(self.dev))
        return None

    def init(self, seed, weights=None):
        net = self.tm.init_model(self.model, seed)
        if weights is not None:
            net.load_state_dict({k: self.torch.from_numpy(np.array(v)) for k, v in
                                 weights.items()})
        self.net = net.to(self.dev)
        if self.world > 1:
            self.dist.prepare_model(self.net, self.dev)
        self.opt = self.tt.make_optimizer(self.net, self.hp["lr"])
        self.schedule = StepSchedule(lr0=self.hp["lr"])  # the presets' constant Adam step size
        self.fwd = self.net  # what the steps call (a torch.compile wrapper in torch-compile)
        if self.world > 1:
            self.ddp = self.dist.wrap(self.net, self.dev)

    def batches(self, h, epoch):
        raise NotImplementedError

    def train_epoch(self, h, epoch):
        # the product's own epoch (torch_cnn.train.run_epoch: the loop ``train`` runs, with
        # its per-step loss check), dropout masks seeded per epoch as ``train`` seeds them
        self.tt.seed_dropout(self.seed, epoch)
        model = self.fwd if self.ddp is None else self.net
        m = self.tt.run_epoch(model, self.opt, self.batches(h, epoch), self.schedule,
                              ddp_model=self.ddp)
        self.sync()
        return {"loss": m["train_loss"], "acc": m["train_acc"]}

    def logits(self, h):
        if self.ddp is not None:  # each rank scores a part
            return self.dist.gather_logits(lambda part: self.tt.evaluate(self.net, part, self.dev),
                                           self.split_of(h), self.dev)
        out = self.tt.evaluate(self.net, self.split_of(h), self.dev)  # host copy = synchronised
        self.sync()
        return out


class TorchTorchvision(TorchCNN):
    name = "torch-torchvision"
    pipeline = "torchvision"
    NUM_WORKERS = 0  # DataLoader worker processes: torch_cnn measured 0 faster on 2 cores

    def put(self, split):
        return split  # host arrays; the DataLoader builds every batch from PIL images

    def split_of(self, h):
        return h

    def batches(self, h, epoch):
        from torch_cnn.pipeline import torchvision_loader
        return torchvision_loader(h, self.seed, epoch, self.hp["batch_size"], self.hp["augment"],
                                  num_workers=self.NUM_WORKERS, device=self.dev)

    def notes(self):
        return [f"torchvision DataLoader num_workers={self.NUM_WORKERS}; its augmentation draws "
                f"come from torch's RNG (same batches, different crops/flips than the other "
                f"backends)"]


class TorchDevice(TorchCNN):
    name = "torch-device"
    pipeline = "device"
    parallel = True

    def put(self, split):
        from torch_cnn.pipeline import DevicePipeline
        return DevicePipeline(split, self.dev), split

    def split_of(self, h):
        return h[1]

    def batches(self, h, epoch):
        return h[0].batches(self.seed, epoch, self.hp["batch_size"], self.hp["augment"],
                            part=None if self.ddp is None else (self.rank, self.world))


class TorchDeviceTuned(TorchDevice):
    """The device pipeline with what a torch user tries for CPU speed: channels_last
    tensors and model, torch's default (foreach) or fused Adam, optionally torch.compile.
    Same hyperparameters, batches and draws as torch-device."""
    channels_last = True
    adam = "foreach"      # "foreach" (torch's default) | "fused"
    compiled = False
    parallel = False

    def put(self, split):
        from torch_cnn.pipeline import DevicePipeline
        return DevicePipeline(split, self.dev, channels_last=self.channels_last), split

    def init(self, seed, weights=None):
        super().init(seed, weights)
        torch = self.torch
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        kw = {"fused": True} if self.adam == "fused" else {}   # default: foreach on
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.hp["lr"],
                                    betas=self.tt.ADAM_BETAS, eps=self.tt.ADAM_EPS, **kw)
        self.fwd = torch.compile(self.net) if self.compiled else self.net

    def logits(self, h):
        out = self.tt.evaluate(self.fwd, self.split_of(h), self.dev,
                               channels_last=self.channels_last)
        self.sync()
        return out

    def notes(self):
        return [f"{self.name}: channels_last={self.channels_last}, Adam {self.adam}"
                + (", torch.compile (default mode)" if self.compiled else "")]


class TorchDeviceCL(TorchDeviceTuned):
    name = "torch-device-cl"


class TorchDeviceFused(TorchDeviceTuned):
    name = "torch-device-fused"
    adam = "fused"


class TorchCompile(TorchDeviceTuned):
    name = "torch-compile"
    compiled = True


# ------------------------------------------------------------------ JAX (both families)
class JaxBackend(Backend):
    parallel = True

    def __init__(self, model, device, seed=0, n_devices=1):
        super().__init__(model, device, seed, n_devices)
        import jax
        from jax_port import model as jm
        from jax_port import steps as js
        self.jax, self.jm, self.js = jax, jm, js
        try:
            devs = jax.devices("gpu" if device == "gpu" else "cpu")
        except RuntimeError as e:
            raise RuntimeError(f"JAX sees no {device} device ({e})") from None
        if n_devices > len(devs):
            raise RuntimeError(f"JAX sees {len(devs)} {device} device(s), not {n_devices}")
        self.dev = devs[0]
        self.spec = jm.get_spec(model)
        self.cfg = js.StepConfig.of(self.spec, augment=self.hp["augment"],
                                    mesh=js.make_mesh(devs[:n_devices]))
        self.runner = js.EpochRunner(self.cfg, batch_size=self.hp["batch_size"], seed=seed,
                                     lr=self.hp["lr"], decay=self.hp["decay"])
        self.full_runner = None  # the full-batch phase's, made on its first epoch

    def use_conv_impl(self, conv_impl: str) -> None:
        self.cfg = dataclasses.replace(self.cfg, conv_impl=conv_impl)
        self.runner.cfg = self.cfg

    def set_seed(self, seed):
        super().set_seed(seed)
        self.runner.seed = seed  # the runner draws its batch order and dropout masks

    def device_name(self):
        name = f"{self.dev.platform}:{getattr(self.dev, 'device_kind', '')}"
        return name if self.n_devices == 1 else f"{self.n_devices} x {name}"

    def peak_device_bytes(self):
        if self.dev.platform == "cpu":
            return None
        stats = self.dev.memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    def put(self, split):
        # uint8 images resident on the device (4x smaller than float); only each epoch's
        # indices and augmentation draws travel per call. Several devices: a copy on each
        # for training, and the split laid out over them once for evaluation.
        js, c = self.js, self.cfg
        if c.mesh is not None:
            return js.put(c, split.images), js.put(c, split.labels), js.eval_set(c, split.images)
        return (self.jax.device_put(split.images, self.dev),
                self.jax.device_put(split.labels, self.dev))

    def init(self, seed, weights=None):
        if weights is None:
            with self.jax.default_device(self.dev):
                variables = self.jm.init_variables(self.spec, seed)
        else:
            from jax_port import convert
            variables = convert.from_canonical(weights)
        if self.cfg.mesh is not None:  # replicated over the devices
            self.state = self.js.init_state(self.cfg, variables)
            return
        with self.jax.default_device(self.dev):
            self.state = self.js.init_state(self.cfg, variables)
        self.state = self.jax.device_put(self.state, self.dev)

    def train_epoch(self, h, epoch):
        # the product's own epoch (jax_port.train runs the same), which ends with
        # jax.block_until_ready(state)
        self.state, m = self.runner.run_epoch(self.state, h[0], h[1], epoch)
        return {"loss": m["train_loss"], "acc": m["train_acc"]}

    def logits(self, h):
        return self.js.logits(self.cfg, self.state.variables, h[-1] if len(h) > 2 else h[0])

    def put_full_batch(self, split):
        # the uint8 split on the device; the full-batch runner makes its float
        # feature-major copy on the first epoch (the warm-up) and keeps it
        return self.put(split)

    def full_batch_epoch(self, h, epoch):
        if self.full_runner is None:
            p = full_batch_hyperparameters(self.model)
            self.full_runner = self.js.EpochRunner(self.cfg, batch_size=None, seed=self.seed,
                                                   lr=p["lr"], decay=p["decay"])
        self.state, m = self.full_runner.run_epoch(self.state, h[0], h[1], epoch)
        return {"loss": m["train_loss"], "acc": m["train_acc"]}

    def notes(self):
        if self.spec.family == "cnn":
            return [f"jax-cnn conv formulation: {self.cfg.conv_impl}"]
        return []


_CLASSES = {"numpy-mlp": NumpyMLP, "torch-torchvision": TorchTorchvision,
            "torch-device": TorchDevice, "torch-device-cl": TorchDeviceCL,
            "torch-device-fused": TorchDeviceFused, "torch-compile": TorchCompile,
            "jax-mlp": JaxBackend, "jax-cnn": JaxBackend}


def make_backend(name: str, model: str, device: str, seed: int = 0,
                 n_devices: int = 1, conv_impl: str | None = None) -> Backend:
    """``conv_impl``: the JAX CNN's convolution formulation (None: the port's default for
    the device); every other backend has one formulation and ignores it."""
    info = BACKENDS[name]
    if family_of(model) != info.family:
        raise ValueError(f"backend {name} runs {info.family.upper()} models, not {model}")
    if n_devices > 1 and not info.parallel:
        raise ValueError(f"backend {name} trains on one device")
    b = _CLASSES[name](model, device, seed, n_devices)
    if conv_impl is not None and name == "jax-cnn":
        b.use_conv_impl(conv_impl)
    b.name = name
    b.jit = info.jit
    return b
