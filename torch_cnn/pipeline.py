"""The two input pipelines (selectable in train.py with ``--pipeline``).

Both visit the training images in the data layer's ``epoch_order(seed, epoch, n)``,
cut into consecutive batches (``batch_slices``, last partial batch kept), and
both end in ``to_input``: uint8 NHWC -> float (B, 3, 32, 32) pixels / 255.

1. ``torchvision_loader``: what the original project ran. A ``Dataset`` hands
   out PIL images through per-sample torchvision transforms
   (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, then
   ``PILToTensor`` + ``to_input``), batched by a ``DataLoader`` whose sampler is
   the epoch order. Its random draws come from torch's RNG, seeded per
   *sample* from ``(seed, epoch, image index)`` inside a forked RNG, so the
   result does not depend on ``num_workers`` and does not touch the global RNG
   (which the training loop uses for dropout).
   (``ToTensor()`` of the original is ``PILToTensor`` followed by /255; doing the
   /255 in ``to_input`` keeps the two pipelines bit-identical.)

2. ``DevicePipeline``: the decoded uint8 arrays are copied to the device once;
   each batch is gathered on the device by index (the epoch order); training
   augmentation uses the data layer's shared draws ``augment_draws(seed, epoch, n)``
   (sliced like the order) and ``augment_torch``, which equals the NumPy
   reference ``data.batching.augment`` bit for bit; then ``to_input``.

Data parallelism (``part=(rank, world)``, torch_cnn/distributed.py): both pipelines
then yield only this rank's rows of each global batch (``data.batching.rank_rows``),
with ``(start, stop, total)`` of those rows, so the ranks together see exactly the
one-process batches and draws.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from core import flags
from data.batching import PAD, augment_draws, batch_slices, epoch_order, rank_rows, rng
from data.errors import UserError

_STREAM_TV_AUG = 11  # rng(seed, 11, epoch): torchvision pipeline's per-epoch transform seed


def flush_denormals() -> None:
    """Treat float32 denormals (below 1.2e-38) as zero in this process's CPU arithmetic, as
    XLA does on the CPU (the JAX port's numbers are unchanged by it).

    Why: once a CNN classifies most CIFAKE images confidently, their logit gradients underflow
    and the backward products through fc1 and fc2 fill with denormals (21% of v3's fc1
    gradient after 150 steps of its preset on real images). Intel cores take a slow path for
    every denormal operand: torch v3 trained at 195 images/s instead of 1,500 on a 2-core Xeon
    (docs/bench.md); random pixels never get confident enough to show it.

    Call it at the start of a process, before torch's first parallel operation: its intra-op
    threads copy the floating-point mode of the thread that creates them, and a later call
    reaches the calling thread alone.
    """
    torch.set_flush_denormal(True)


def resolve_device(name: str) -> torch.device:
    """--device auto | cpu | gpu (cuda) -> a torch device."""
    kind = flags.device(name)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "gpu" and not torch.cuda.is_available():
        raise UserError(f"--device gpu: CUDA is not available to this torch "
                        f"{torch.__version__} (no GPU or a CPU-only build); use --device cpu")
    return torch.device("cuda" if kind == "gpu" else "cpu")


def to_input(images_u8_nhwc: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> float32 (B, 3, 32, 32) = pixels / 255 (no mean/std).

    The permute of a contiguous NHWC tensor *is* channels_last memory format;
    ``channels_last=False`` makes it a plain contiguous NCHW tensor. The values
    are identical either way (float32 x / 255, as ``data.batching.to_float``).
    """
    x = images_u8_nhwc.permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format)
    return x.to(torch.float32).div_(255.0)


def augment_torch(images_u8_nhwc: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                  flip: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Zero-pad by ``pad``, crop 32x32 at (dy, dx) of the padded image, then flip
    horizontally where ``flip``: ``data.batching.augment`` on the tensor's device.
    Pure indexing (no arithmetic), so the result is bit-identical to NumPy's."""
    b, h, w, c = images_u8_nhwc.shape
    dev = images_u8_nhwc.device
    padded = images_u8_nhwc.new_zeros((b, h + 2 * pad, w + 2 * pad, c))
    padded[:, pad:pad + h, pad:pad + w] = images_u8_nhwc
    dy, dx = dy.to(dev, torch.long), dx.to(dev, torch.long)
    flip = flip.to(dev, torch.bool)
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]          # (B, H)
    cols = dx[:, None] + torch.arange(w, device=dev)[None, :]          # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)              # flip after the crop
    bidx = torch.arange(b, device=dev)[:, None, None]
    return padded[bidx, rows[:, :, None], cols[:, None, :]]


class DevicePipeline:
    """A split's uint8 images and labels on ``device``, batched there by index."""

    def __init__(self, split, device: str | torch.device = "cpu", channels_last: bool = False):
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.n = len(split)
        # Moved once; uint8 is 4x smaller than float (100k images = 307 MB).
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).to(self.device)
        self.labels = torch.from_numpy(split.labels.astype(np.float32)).to(self.device)

    def batches(self, seed: int, epoch: int, batch_size: int | None,
                augment: bool, part: tuple[int, int] | None = None) -> Iterator[tuple]:
        """Yield (x float (B, 3, 32, 32), y float (B,)) on the device for one epoch; with
        ``part=(rank, world)``, (x, y, (start, stop, total)) of this rank's rows of each
        global batch."""
        order = torch.from_numpy(epoch_order(seed, epoch, self.n)).to(self.device)
        draws = augment_draws(seed, epoch, self.n) if augment else None
        if draws is not None:
            dy = torch.from_numpy(draws.dy).to(self.device)
            dx = torch.from_numpy(draws.dx).to(self.device)
            flip = torch.from_numpy(draws.flip).to(self.device)
        for s in batch_slices(self.n, batch_size):
            rows = None
            if part is not None:
                total = s.stop - s.start
                lo, hi = rank_rows(total, *part)
                rows, s = (lo, hi, total), slice(s.start + lo, s.start + hi)
            idx = order[s]
            imgs = self.images.index_select(0, idx)
            if draws is not None:
                imgs = augment_torch(imgs, dy[s], dx[s], flip[s])
            x, y = to_input(imgs, self.channels_last), self.labels.index_select(0, idx)
            yield (x, y) if rows is None else (x, y, rows)


# ------------------------------------------------------------------ torchvision pipeline
class _TorchvisionDataset(torch.utils.data.Dataset):
    """uint8 arrays -> PIL -> per-sample torchvision transforms -> uint8 CHW tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool, epoch_seed: int):
        from torchvision import transforms as T
        self.images, self.labels = images, labels
        self.epoch_seed = epoch_seed
        self.augment = augment
        self.random = T.Compose([T.RandomCrop(32, padding=PAD), T.RandomHorizontalFlip()]) \
            if augment else None
        self.to_tensor = T.PILToTensor()  # uint8 (3, H, W); /255 happens in to_input

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        im = Image.fromarray(self.images[i])
        if self.random is not None:
            # One seed per (epoch, image): reproducible whatever the worker count.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.epoch_seed + int(i)) % (2**63 - 1))
                im = self.random(im)
        return self.to_tensor(im), int(self.labels[i])


class _OrderSampler(torch.utils.data.Sampler):
    def __init__(self, order: np.ndarray):
        self.order = order

    def __iter__(self):
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


def _collate(batch):
    if not batch:  # a rank's empty part of a last batch smaller than the world
        return torch.zeros((0, 3, 32, 32), dtype=torch.uint8), torch.zeros(0)
    imgs = torch.stack([b[0] for b in batch])                      # (B, 3, 32, 32) uint8
    labels = torch.tensor([b[1] for b in batch], dtype=torch.float32)
    return imgs, labels


def torchvision_loader(split, seed: int, epoch: int, batch_size: int | None, augment: bool,
                       num_workers: int = 0, device: str | torch.device = "cpu",
                       channels_last: bool = False, part: tuple[int, int] | None = None
                       ) -> Iterator[tuple]:
    """Yield (x float (B, 3, 32, 32), y float (B,)) for one epoch, on ``device``; with
    ``part=(rank, world)``, (x, y, (start, stop, total)) of this rank's rows of each
    global batch (as ``DevicePipeline.batches``).

    ``num_workers``: DataLoader worker processes (0 = in the main process; on
    this project's 2-core machines 0 measured faster, see the README/report).
    """
    n = len(split)
    order = epoch_order(seed, epoch, n)
    epoch_seed = int(rng(seed, _STREAM_TV_AUG, epoch).integers(0, 2**62))
    ds = _TorchvisionDataset(split.images, split.labels, augment, epoch_seed)
    pin = torch.device(device).type == "cuda"
    if part is None:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=n if batch_size is None else batch_size,
            sampler=_OrderSampler(order), drop_last=False, num_workers=num_workers,
            collate_fn=_collate, pin_memory=pin, persistent_workers=False)
        rows = [None] * len(loader)
    else:
        rows, index_lists = [], []
        for s in batch_slices(n, batch_size):
            total = s.stop - s.start
            lo, hi = rank_rows(total, *part)
            rows.append((lo, hi, total))
            index_lists.append(order[s.start + lo:s.start + hi].tolist())
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=index_lists, num_workers=num_workers, collate_fn=_collate,
            pin_memory=pin, persistent_workers=False)
    dev = torch.device(device)
    for (imgs_chw, y), r in zip(loader, rows):
        imgs_nhwc = imgs_chw.permute(0, 2, 3, 1)  # back to the layout to_input takes
        x, y = (to_input(imgs_nhwc.to(dev, non_blocking=True), channels_last),
                y.to(dev, non_blocking=True))
        yield (x, y) if r is None else (x, y, r)


__all__ = ["flush_denormals", "resolve_device", "to_input", "augment_torch", "DevicePipeline",
           "torchvision_loader"]
