"""Data-parallel training with ``DistributedDataParallel``, started by ``torchrun``.

``torchrun --nproc-per-node N -m torch_cnn.train ...`` starts N processes (ranks); each
holds the model, the optimizer and the whole uint8 training split, and trains on its part
of every global batch. The global function is the one-process function:

- batches: each global batch of the epoch order (``data.batching``, the preset's size) is
  cut into contiguous parts, one per rank (``data.batching.rank_rows``); the
  augmentation draws are sliced the same way. This is the equivalent of a
  ``DistributedSampler`` that keeps the global batches instead of reshuffling per rank,
  and pads nothing: a last partial batch that does not split evenly gives some ranks
  one image more;
- loss and gradients: each rank backpropagates its images' summed loss times
  ``world / global batch``; DDP averages gradients over the ranks, which makes that the
  global batch's mean-loss gradient also when the parts differ in size;
- dropout (``GlobalBatchDropout``): every rank draws the global batch's keep-mask from the
  same seeded torch RNG, as one process would, and keeps its rows;
- BatchNorm (v3, net4): statistics over the global batch. On CUDA this is ``nn.SyncBatchNorm``;
  torch's SyncBatchNorm runs on GPUs only (its kernels have no CPU version), so on the
  CPU (gloo) ``AllReduceBatchNorm2d`` computes the same statistics with all-reduces of
  per-channel sums (the backward is the closed form of batch norm's gradient with the
  sums reduced the same way);
- reported loss / accuracy: all-reduced per step, the global batch's.

Rank 0 alone writes the run directory (``core.driver``); every rank reads it on --resume.
Evaluation is split over the ranks (contiguous parts, gathered in order).
"""
from __future__ import annotations

import atexit
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from data.batching import rank_rows
from data.errors import UserError
from core.recipe import smooth_targets


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    def env_int(name, default):
        v = os.environ.get(name)
        try:
            return default if v is None else int(v)
        except ValueError:
            raise UserError(f"{name}={v!r}: not an integer (set by torchrun)") from None
    size = env_int("WORLD_SIZE", 1)
    rank, local = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank}, WORLD_SIZE={size}: not a rank of the world")
    return rank, size, local


def start(device: torch.device, local_rank: int) -> torch.device:
    """Join the process group (NCCL for CUDA, gloo for the CPU); -> this rank's device."""
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: this host has "
                            f"{torch.cuda.device_count()} CUDA device(s); start at most that "
                            f"many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_stop)
    return device


def exit_hard(run) -> None:
    """Run ``run()`` (which ends in ``sys.exit``) and leave with its status without the
    interpreter's teardown. gloo's background threads can still be alive when C++ static
    destructors run at a normal exit, which aborts the process ("terminate called without
    an active exception") after the run is complete and written. Every rank waits at a
    barrier first, so no peer is still talking to the group."""
    try:
        run()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    try:
        if dist.is_initialized():
            dist.barrier()
    except Exception:  # a peer already failed: leave with this rank's own status
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop() -> None:
    # DistributedDataParallel leaves reference cycles that keep the group's threads
    # alive; collected first, or many exits abort ("terminate called without an active
    # exception", measured with gloo)
    import gc
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ the model's parts
class GlobalBatchDropout(nn.Dropout):
    """``nn.Dropout`` whose training mask is rows ``rows = (start, stop, total)`` of the
    mask one process would draw for the whole global batch of ``total`` images.

    Every rank draws the (total, ...) mask with ``torch.native_dropout`` -- the same draw
    ``F.dropout`` makes on that device (tested on the CPU; checked on CUDA with torch
    2.11) -- from the same seeded RNG,
    so the ranks' rows tile the one-process mask. ``rows=None``: plain ``nn.Dropout``."""

    rows: tuple[int, int, int] | None = None

    def forward(self, x):
        if not self.training or self.rows is None or self.p == 0:
            return super().forward(x)
        start, stop, total = self.rows
        if stop - start != x.shape[0]:
            raise ValueError(f"dropout rows {start}:{stop} for a batch of {x.shape[0]}")
        mask = torch.native_dropout(x.new_ones((total,) + tuple(x.shape[1:])), self.p, True)[1]
        return x * mask[start:stop] * (1.0 / (1.0 - self.p))


class _AllReduceBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over the images of every rank: (N, C, H, W) -> same."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        c = x.shape[1]
        shape = (1, c, 1, 1)
        sums = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() // c)])
        dist.all_reduce(sums)
        n = sums[c]
        mean = sums[:c] / n
        xc = x - mean.view(shape)
        sq = (xc * xc).sum((0, 2, 3))
        dist.all_reduce(sq)
        var = sq / n                                     # biased: used to normalise
        invstd = torch.rsqrt(var + eps)
        with torch.no_grad():                            # torch stores the unbiased variance
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
        xhat = xc * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, n)
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, g):
        xhat, weight, invstd, n = ctx.saved_tensors
        c = g.shape[1]
        shape = (1, c, 1, 1)
        dbias = g.sum((0, 2, 3))
        dweight = (g * xhat).sum((0, 2, 3))
        sums = torch.cat([dbias, dweight])
        dist.all_reduce(sums)
        # the input gradient needs the global sums; the parameters' local ones (DDP
        # averages those over the ranks, as it does every other gradient)
        gx = (weight * invstd).view(shape) * (
            g - (sums[:c] / n).view(shape) - xhat * (sums[c:] / n).view(shape))
        return gx, dweight, dbias, None, None, None, None


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with training statistics over the global batch of every rank, for the
    CPU, where ``nn.SyncBatchNorm`` does not run. Same parameters, buffers and names."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _AllReduceBatchNorm.apply(x, self.weight, self.bias, self.running_mean,
                                         self.running_var, self.eps, self.momentum)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model's BatchNorms made global-batch (SyncBatchNorm on CUDA, else
    AllReduceBatchNorm2d) and its dropout a GlobalBatchDropout, in place and keeping the
    same Parameter objects and state_dict names. Call before building the optimizer.
    Nested modules too (net4's BatchNorms sit inside its stem and blocks)."""
    for path, mod in list(model.named_modules()):
        if not path:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(mod, nn.BatchNorm2d) and not isinstance(mod, AllReduceBatchNorm2d):
            if device.type == "cuda":
                new = nn.SyncBatchNorm.convert_sync_batchnorm(mod)
            else:
                new = AllReduceBatchNorm2d(mod.num_features, mod.eps, mod.momentum,
                                           mod.affine, mod.track_running_stats,
                                           device=mod.weight.device)
                new.weight, new.bias = mod.weight, mod.bias
                new.running_mean, new.running_var = mod.running_mean, mod.running_var
                new.num_batches_tracked = mod.num_batches_tracked
            setattr(parent, name, new)
        elif type(mod) is nn.Dropout:
            setattr(parent, name, GlobalBatchDropout(mod.p))
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (its parameters are broadcast from rank
    0, which every rank already holds: the same seeded init or the same resume file)."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


# ------------------------------------------------------------------ a step
def train_step(ddp: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, rows: tuple[int, int, int],
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step on this rank's rows ``(start, stop, total)`` of a global batch
    (``torch_cnn.train.train_step``'s, split). Returns (the global batch's mean BCE loss
    against the (smoothed) targets, its number correct), the same on every rank, as
    device tensors."""
    start, stop, total = rows
    ddp.train()
    optimizer.zero_grad(set_to_none=True)
    drop = getattr(model, "dropout", None)
    if isinstance(drop, GlobalBatchDropout):
        drop.rows = rows
    logits = ddp(x)
    loss_sum = F.binary_cross_entropy_with_logits(logits, smooth_targets(y, label_smoothing),
                                                  reduction="sum")
    (loss_sum * (dist.get_world_size() / total)).backward()
    optimizer.step()
    stats = torch.stack([loss_sum.detach(), ((logits.detach() > 0) == (y > 0.5)).sum().to(
        loss_sum.dtype)])
    dist.all_reduce(stats)
    return stats[0] / total, stats[1]


# ------------------------------------------------------------------ evaluation
class _Rows:
    """Rows [lo, hi) of a split, as ``torch_cnn.train.evaluate`` reads one."""

    def __init__(self, images, lo, hi):
        self.images = images[lo:hi]

    def __len__(self):
        return int(self.images.shape[0])


def gather_logits(evaluate, split, device: torch.device) -> np.ndarray:
    """``evaluate(part)`` (logits of a split-like part) on this rank's contiguous part of
    ``split``, gathered from every rank in order: the whole split's logits on every rank."""
    rank, size = dist.get_rank(), dist.get_world_size()
    n = len(split)
    per = -(-n // size)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    local = torch.zeros(per, dtype=torch.float32)
    local[:hi - lo] = torch.from_numpy(evaluate(_Rows(split.images, lo, hi)))
    local = local.to(device)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu().numpy()[:n]


__all__ = ["world", "start", "GlobalBatchDropout", "AllReduceBatchNorm2d", "prepare_model",
           "wrap", "train_step", "gather_logits", "rank_rows"]
