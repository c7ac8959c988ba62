"""Train one of the CNNs on CIFAKE: ``python -m torch_cnn.train --model baseline|dropout|v3|net4``.

The shared flags and the run directory are ``core.driver``'s; the CNN's own flags are
``--device cpu|cuda|auto``, ``--pipeline device|torchvision``, ``--workers``
(torchvision DataLoader workers), ``--channels-last`` and ``--threads``.

Randomness, all derived from (seed, epoch) so --resume needs no saved RNG state:
  weight init  : core.init.cnn_init(model, seed)                        (model.init_model)
  batch order  : data.batching.epoch_order(seed, epoch, n)
  augmentation : device pipeline: augment_draws(seed, epoch, n); torchvision pipeline:
                 per-image torch seeds from rng(seed, 11, epoch) (pipeline.py)
  dropout      : torch's global RNG, seeded at the start of each epoch from
                 data.batching.dropout_rng(seed, epoch)
Epochs are numbered from 1 in the history and in the RNG keys.

Recipe (``--preset v3-recipe`` or the recipe flags; per-step numbers from
``core.recipe.StepSchedule``, the same in the JAX port):
  schedule     : --schedule onecycle sets the param group's lr before every step
  label smooth : the BCE target of ``train_step`` is ``core.recipe.smooth_targets(y, eps)``
  EMA          : a second model holds the moving average of the parameters (weights and
                 biases, BatchNorm's scale and shift included), updated after every step
                 with ``ema <- d_t ema + (1 - d_t) live``; its buffers (BatchNorm's
                 running statistics, already a moving average of batch statistics) are
                 the live model's, copied. Evaluation and model.safetensors use it.
  TTA          : ``model.FlipAverage`` around the evaluated model (and predict's, export's)

Resume state (state.safetensors): the weights as "model.<name>" + Adam tensors
"adam.{exp_avg,exp_avg_sq,step}.<name>" (+ "ema.<name>" for every state_dict tensor of
the moving average when there is one), metadata epoch_completed.

Several processes: ``torchrun --nproc-per-node N -m torch_cnn.train ...`` trains with
DistributedDataParallel (gloo on the CPU, NCCL on CUDA: one GPU per process), each rank
on its part of the same global batches (distributed.py); rank 0 alone writes the run
directory. One process (no torchrun, or a world of 1) is the computation above, unchanged.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import platform
from importlib import metadata

import numpy as np
import torch
from torch.nn import functional as F

from core import flags
from data.batching import dropout_rng, num_batches
from core.architecture import cnn_tensors
from core.catalog import AUGMENTED_MODELS, CNN_MODELS
from core.driver import NonFiniteLoss, Stack, train
from data.errors import UserError, run_cli
from core.recipe import StepSchedule, smooth_targets
from core.tensors import load_safetensors, save_safetensors

from . import checkpoint
from . import distributed as ddp
from .model import init_model, with_tta
from .pipeline import DevicePipeline, flush_denormals, resolve_device, to_input, torchvision_loader

EVAL_BATCH = 1000        # images per forward pass in evaluation (memory only, not results)
ADAM_BETAS = (0.9, 0.999)  # torch defaults (the original is silent)
ADAM_EPS = 1e-8
PIPELINES = ("device", "torchvision")


# ------------------------------------------------------------------ reusable pieces
def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, label_smoothing: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step on a batch. Returns (mean BCE loss against the (smoothed) targets,
    number correct), both as detached device tensors (no host sync here)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits, smooth_targets(y, label_smoothing))
    loss.backward()
    optimizer.step()
    n_correct = ((logits.detach() > 0) == (y > 0.5)).sum()
    return loss.detach(), n_correct


def seed_dropout(seed: int, epoch: int) -> None:
    """Seed torch's global RNG, which draws the dropout masks, for ``epoch`` (1-based) of
    ``seed`` (manual_seed seeds the CPU and every CUDA generator)."""
    torch.manual_seed(int(dropout_rng(seed, epoch).integers(0, 2**63 - 1)))


def run_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches,
              schedule: StepSchedule, first_step: int = 0, label_smoothing: float = 0.0,
              ema=None, ddp_model=None, progress=None) -> dict:
    """One pass over ``batches`` (the pipeline's (x, y), or (x, y, rows) under DDP) ->
    {"lr", "train_loss", "train_acc"}: the epoch ``train`` runs, and what the bench times.

    ``first_step``: global index of the epoch's first step (the schedule's and the EMA's
    clock); ``ema``: ``ema_pairs`` of a moving average to update after every step;
    ``ddp_model``: the DistributedDataParallel wrapper of ``model`` when training on
    several processes; ``progress(images done, loss)`` after each step. Raises
    NonFiniteLoss (1-based step) at the first non-finite loss. Returns once the device is
    idle."""
    loss_sum, correct, seen, n_steps = 0.0, 0, 0, 0
    for step, batch in enumerate(batches, 1):
        if schedule.varies:
            set_lr(optimizer, schedule.lr(first_step + step - 1))
        if ddp_model is None:
            x, y = batch
            loss, nc = train_step(model, optimizer, x, y, label_smoothing)
            n = len(y)
        else:  # the global batch's loss and count, the same on every rank
            x, y, rows = batch
            loss, nc = ddp.train_step(ddp_model, model, optimizer, x, y, rows, label_smoothing)
            n = rows[2]
        if ema is not None:
            ema_update(ema, schedule.ema_decay(first_step + step - 1))
        lv = loss.item()  # host sync; also the non-finite check below
        if not math.isfinite(lv):
            raise NonFiniteLoss(step, lv)
        loss_sum, correct, seen, n_steps = loss_sum + lv, correct + int(nc), seen + n, step
        if progress is not None:
            progress(seen, lv)
    if n_steps and x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return {"lr": schedule.lr(first_step), "train_loss": loss_sum / max(n_steps, 1),
            "train_acc": 100.0 * correct / max(seen, 1)}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split, device, batch_size: int = EVAL_BATCH,
             channels_last: bool = False) -> np.ndarray:
    """Logits (N,) float32 of the whole split, in stored order, in eval mode
    (dropout off, BN running statistics). Restores the model's previous mode."""
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    out = []
    for i in range(0, len(split), batch_size):
        imgs = torch.from_numpy(np.ascontiguousarray(split.images[i:i + batch_size])).to(dev)
        out.append(model(to_input(imgs, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def ema_pairs(ema_model: torch.nn.Module, model: torch.nn.Module):
    """(averaged parameters, their live counterparts, (average's buffer, live buffer)
    pairs): the state_dict tensors share storage with the modules, so updating them
    updates the modules."""
    avg, live = ema_model.state_dict(), model.state_dict()
    params = [k for k, _ in model.named_parameters()]
    buffers = [k for k in live if k not in params]
    return ([avg[k] for k in params], [live[k] for k in params],
            [(avg[k], live[k]) for k in buffers])


@torch.no_grad()
def ema_update(pairs, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * live`` for every parameter (see
    ``core.recipe.ema_decay_at`` for ``decay``). Buffers are copied: BatchNorm's running
    statistics are a moving average already, and averaging them again would add their
    own start (mean 0, var 1) and lag to the average's (on the mini archive that turned
    an 85% network into a coin toss)."""
    avg, live, buffers = pairs
    torch._foreach_mul_(avg, decay)
    torch._foreach_add_(avg, live, alpha=1.0 - decay)
    for a, b in buffers:
        a.copy_(b)


def new_ema_model(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # foreach=False: the plain per-parameter loop, the same arithmetic on every device
    return torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                            foreach=False)


def optimizer_tensors(model, optimizer) -> dict[str, np.ndarray]:
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if not st:
            continue
        for k in ("exp_avg", "exp_avg_sq", "step"):
            out[f"adam.{k}.{name}"] = torch.as_tensor(st[k]).detach().cpu().numpy()
    return out


def state_shapes(model, name: str, ema: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected contents of state.safetensors: weights + Adam tensors per parameter (+ the
    moving average's state_dict when ``ema``)."""
    out = {f"model.{k}": v for k, v in cnn_tensors(name).items()}
    if ema:
        out.update({f"ema.{k}": v for k, v in cnn_tensors(name).items()})
    for pname, p in model.named_parameters():
        shape = tuple(p.shape)
        out.update({f"adam.exp_avg.{pname}": (shape, "float32"),
                    f"adam.exp_avg_sq.{pname}": (shape, "float32"),
                    f"adam.step.{pname}": ((), "float32")})
    return out


def load_optimizer_tensors(model, optimizer, tensors: dict[str, np.ndarray], where) -> None:
    sd = optimizer.state_dict()
    state = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        keys = [f"adam.{k}.{name}" for k in ("exp_avg", "exp_avg_sq", "step")]
        if not all(k in tensors for k in keys):
            raise UserError(f"{where}: Adam state for '{name}' missing")
        ea, eas, step = (torch.from_numpy(np.array(tensors[k])) for k in keys)
        if ea.shape != p.shape or eas.shape != p.shape:
            raise UserError(f"{where}: Adam state for '{name}' has the wrong shape")
        state[i] = {"step": step, "exp_avg": ea, "exp_avg_sq": eas}
    sd["state"] = state
    optimizer.load_state_dict(sd)


def versions() -> dict:
    # torchvision's version from its package metadata: importing it costs ~2 s per run
    # and training without the torchvision pipeline never needs it
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": metadata.version("torchvision"), "numpy": np.__version__}


# ------------------------------------------------------------------ the stack
class _BoolFlag(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        setattr(ns, self.dest, not option_string.startswith("--no-"))


class TorchCNN(Stack):
    name = "torch_cnn"
    description = "Train a CIFAKE CNN (baseline | dropout | v3 | net4)."
    models = CNN_MODELS
    default_model = "baseline"
    # where and how fast, not what: a run may continue on another device or thread count
    resume_flags = frozenset({"device", "threads", "workers"})
    checks = {"pipeline": flags.choice("--pipeline", PIPELINES),
              "workers": flags.workers, "channels_last": flags.boolean("--channels-last"),
              "threads": flags.optional(flags.threads)}

    def add_flags(self, ap):
        ap.add_argument("--pipeline", choices=PIPELINES, default="device",
                        help="input pipeline: device (uint8 data on the device, default) or "
                             "torchvision (PIL transforms + DataLoader, as the original)")
        ap.add_argument("--workers", type=flags.workers, default=0,
                        help="DataLoader worker processes for --pipeline torchvision (default 0)")
        ap.add_argument("--channels-last", action=_BoolFlag, nargs=0, dest="channels_last",
                        default=False,
                        help="feed channels_last (NHWC-strided) tensors (default: off)")
        ap.add_argument("--no-channels-last", action=_BoolFlag, nargs=0, dest="channels_last")
        ap.add_argument("--threads", type=flags.threads,
                        help="torch intra-op CPU threads (default: torch's choice)")

    def configure(self, cfg):
        if cfg.get("workers") and cfg.get("pipeline") != "torchvision":
            raise UserError(f"--workers {cfg['workers']} applies to --pipeline torchvision only "
                            f"(the device pipeline has no DataLoader)")
        cfg.update(augment=cfg["model"] in AUGMENTED_MODELS, optimizer="adam",
                   adam_betas=list(ADAM_BETAS), adam_eps=ADAM_EPS)

    def processes(self):
        self.rank, self.world, self.local_rank = ddp.world()
        return self.rank, self.world

    def build(self, cfg, ds):
        self.cfg, self.seed, self.ds = cfg, cfg["seed"], ds
        self.device = resolve_device(cfg["device"])
        world = getattr(self, "world", 1)
        if world > 1:
            if cfg["batch_size"] % world:
                raise UserError(f"--batch-size {cfg['batch_size']} does not split evenly over "
                                f"{world} processes; choose a batch size divisible by {world} "
                                f"or a --nproc-per-node dividing {cfg['batch_size']}")
            self.device = ddp.start(self.device, self.local_rank)
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        self.model = init_model(cfg["model"], self.seed, cfg.get("dropout_p")).to(self.device)
        if cfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = None
        if world > 1:  # global-batch BatchNorm and dropout, before the optimizer sees them
            ddp.prepare_model(self.model, self.device)
        self.optimizer = make_optimizer(self.model, cfg["lr"])
        self.train_split = ds.train
        self.steps_per_epoch = num_batches(len(ds.train), cfg["batch_size"])
        self.schedule = StepSchedule.from_config(cfg, self.steps_per_epoch)
        self.ema_model = new_ema_model(self.model) if self.schedule.ema else None
        self.ema_pairs = ema_pairs(self.ema_model, self.model) if self.ema_model else None
        if world > 1:  # (the moving average copies the model as it is, without DDP's hooks)
            self.ddp = ddp.wrap(self.model, self.device)
        if cfg["pipeline"] == "device":
            self.pipe = DevicePipeline(ds.train, self.device, channels_last=cfg["channels_last"])
        kind = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        facts = {"device": str(self.device), "device_kind": kind,
                 "threads": torch.get_num_threads(),
                 "eval_batch_size": EVAL_BATCH, "versions": versions()}
        if world > 1:
            facts.update(world_size=world, ddp_backend=torch.distributed.get_backend())
        return facts

    def load(self, path):
        name = self.cfg["model"]
        tensors, meta = load_safetensors(path, state_shapes(self.model, name,
                                                            self.ema_model is not None))
        if meta.get("model") != name:
            raise UserError(f"{path}: holds model {meta.get('model')!r}, the run's config "
                            f"says {name!r}")
        for prefix, module in (("model.", self.model), ("ema.", self.ema_model)):
            if module is not None:
                module.load_state_dict({k[len(prefix):]: torch.from_numpy(np.array(v))
                                        for k, v in tensors.items() if k.startswith(prefix)})
        load_optimizer_tensors(self.model, self.optimizer, tensors, path)
        try:
            return int(meta.get("epoch_completed", ""))
        except ValueError:
            raise UserError(f"{path}: metadata 'epoch_completed' missing") from None

    def train_epoch(self, epoch, progress):
        cfg, epoch = self.cfg, epoch + 1  # the torch stack keys its random streams 1-based
        seed_dropout(self.seed, epoch)
        part = None if self.ddp is None else (self.rank, self.world)
        if cfg["pipeline"] == "device":
            batches = self.pipe.batches(self.seed, epoch, cfg["batch_size"], cfg["augment"],
                                        part=part)
        else:
            batches = torchvision_loader(self.train_split, self.seed, epoch, cfg["batch_size"],
                                         cfg["augment"], num_workers=cfg["workers"],
                                         device=self.device, channels_last=cfg["channels_last"],
                                         part=part)
        return run_epoch(self.model, self.optimizer, batches, self.schedule,
                         first_step=(epoch - 1) * self.steps_per_epoch,
                         label_smoothing=cfg["label_smoothing"], ema=self.ema_pairs,
                         ddp_model=self.ddp, progress=progress)

    def set_train_images(self, images):
        # the split's own images stay for evaluation; only training sees the copy
        self.train_split = dataclasses.replace(self.ds.train, images=images)
        if self.cfg["pipeline"] == "device":
            self.pipe = DevicePipeline(self.train_split, self.device,
                                       channels_last=self.cfg["channels_last"])

    @property
    def final_model(self) -> torch.nn.Module:
        """What is evaluated and saved: the moving average when there is one."""
        return self.ema_model if self.ema_model is not None else self.model

    def logits(self, split):
        def run(part):
            return evaluate(with_tta(self.final_model, self.cfg["tta"]), part, self.device,
                            channels_last=self.cfg["channels_last"])
        if self.ddp is None:
            return run(split)
        return ddp.gather_logits(run, split, self.device)  # each rank scores a part

    def save_state(self, path, epoch):
        tensors = {f"model.{k}": v for k, v in checkpoint.state_to_numpy(self.model).items()}
        tensors.update(optimizer_tensors(self.model, self.optimizer))
        if self.ema_model is not None:
            tensors.update({f"ema.{k}": v
                            for k, v in checkpoint.state_to_numpy(self.ema_model).items()})
        save_safetensors(path, tensors, {"family": "cnn", "model": self.cfg["model"],
                                         "epoch_completed": str(epoch)})

    def save_model(self, path):
        checkpoint.save(path, self.final_model, self.cfg["model"])


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # before torch starts its threads (see its docstring)
    return train(TorchCNN(), argv)


if __name__ == "__main__":
    if ddp.world()[1] > 1:  # under torchrun: see distributed.exit_hard
        ddp.exit_hard(lambda: run_cli(main, prog="torch_cnn.train"))
    run_cli(main, prog="torch_cnn.train")
