"""The three CNNs of the original project, from one builder, and net4 (beyond it).

    baseline: Conv(3->32, 3x3, pad 1) -> ReLU -> MaxPool 2        (32, 16, 16)
              Conv(32->64, 3x3, pad 1) -> ReLU -> MaxPool 2       (64, 8, 8)
              Flatten (torch (C, H, W) order, 4096) -> Linear 4096->512 -> ReLU -> Linear 512->1
    dropout:  baseline + Dropout(p=0.5) after FC1's ReLU
    v3:       dropout + BatchNorm2d after each conv (before its ReLU); trained with augmentation
              (random crop 32 / padding 4, horizontal flip: see pipeline.py)

Output: ONE logit per image, shape (B,), = log-odds that the image is REAL
(label 1); P(FAKE) = 1 - sigmoid(logit). The network never applies the
sigmoid: training uses BCE-with-logits, which is stable for large |logit|.

Input: float (B, 3, 32, 32) pixels / 255 in [0, 1], NCHW or channels_last
memory format (same values either way).

Module attribute names are the canonical checkpoint names shared by the CNN
family: conv1, [bn1], conv2, [bn2], fc1, fc2. Only v3 creates bn1/bn2, so the
baseline's state_dict has no BN keys. Dropout and pooling have no state.
Convs keep their bias (torch default) even where BN follows.

    net4:     stem conv3x3(3->16) -> BN -> ReLU; 3 blocks c_in -> c_out (32, 64, 128):
              conv3x3 -> MaxPool 2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU; global max
              pool -> Linear 128->1 (``Net4``; convs without bias; trained with v3's
              augmentation; no dropout). Layer names, parameter count and FLOPs:
              core/architecture.py. The global max pool is ``F.max_pool2d`` with a
              kernel covering the whole 4x4 map: its gradient goes to the FIRST maximum
              in row-major order, as the 2x2 pooling's does, a rule the JAX port copies
              exactly (``torch.amax`` would split it evenly among tied maxima instead).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from core.architecture import (CONV_CHANNELS, DROPOUT_P, FC_HIDDEN, FEATURES, KERNEL,
                               NET4_FEATURES, NET4_STEM, NET4_WIDTHS, cnn_layout,
                               has_batchnorm, has_dropout)
from core.catalog import CNN_MODELS
from core.init import cnn_init
from core.recipe import TTA_MODES

MODELS = CNN_MODELS


class CifakeCNN(nn.Module):
    def __init__(self, name: str, dropout_p: float | None = None):
        """``dropout_p``: probability of zeroing an fc1 activation in training (None: the
        original's DROPOUT_P); only the models with a dropout layer take one."""
        super().__init__()
        if name not in MODELS or cnn_layout(name) != "original":
            raise ValueError(f"{name!r} is not one of the original CNNs (baseline, dropout, "
                             f"v3); build_model builds every model of {', '.join(MODELS)}")
        self.name = name
        self.use_bn = has_batchnorm(name)
        self.use_dropout = has_dropout(name)
        if dropout_p is not None and not self.use_dropout:
            raise ValueError(f"{name} has no dropout layer (dropout_p {dropout_p})")
        # Attribute creation order = state_dict order = canonical checkpoint order.
        c1, c2 = CONV_CHANNELS
        self.conv1 = nn.Conv2d(3, c1, kernel_size=KERNEL, padding=KERNEL // 2)
        if self.use_bn:
            self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=KERNEL, padding=KERNEL // 2)
        if self.use_bn:
            self.bn2 = nn.BatchNorm2d(c2)
        self.fc1 = nn.Linear(FEATURES, FC_HIDDEN)
        self.fc2 = nn.Linear(FC_HIDDEN, 1)
        self.dropout = nn.Dropout(DROPOUT_P if dropout_p is None else dropout_p) \
            if self.use_dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.use_bn:
            x = self.bn1(x)
        x = F.max_pool2d(F.relu(x), 2)
        x = self.conv2(x)
        if self.use_bn:
            x = self.bn2(x)
        x = F.max_pool2d(F.relu(x), 2)
        # reshape (not .view): works for channels_last activations too, and always
        # flattens in logical (C, H, W) order, the order fc1.weight's columns use.
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc2(x).squeeze(1)  # (B, 1) -> (B,)


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=KERNEL, padding=KERNEL // 2, bias=False)


class _Stem(nn.Module):
    """conv -> BN -> ReLU (state_dict names ``conv.weight``, ``bn.*``)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = _conv3x3(c_in, c_out)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _Block(nn.Module):
    """conv1 -> MaxPool 2 -> bn1 -> ReLU -> conv2 -> bn2 -> ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = F.relu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.relu(self.bn2(self.conv2(x)))


class Net4(nn.Module):
    """net4 (core/architecture.py). Attribute creation order = state_dict order = the
    canonical table's: stem.{conv,bn}, block{1,2,3}.{conv1,bn1,conv2,bn2}, fc."""

    name = "net4"
    use_bn = True          # the attributes the rest of the stack reads off a CNN
    use_dropout = False
    dropout = None

    def __init__(self, dropout_p: float | None = None):
        super().__init__()
        if dropout_p is not None:
            raise ValueError(f"net4 has no dropout layer (dropout_p {dropout_p})")
        self.stem = _Stem(3, NET4_STEM)
        c_in = NET4_STEM
        for b, c_out in enumerate(NET4_WIDTHS, start=1):
            setattr(self, f"block{b}", _Block(c_in, c_out))
            c_in = c_out
        self.fc = nn.Linear(NET4_FEATURES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        # global max pool: first maximum in row-major order gets the gradient (see above)
        x = F.max_pool2d(x, kernel_size=x.shape[-2:]).flatten(1)   # (B, 128)
        return self.fc(x).squeeze(1)  # (B, 1) -> (B,)


class FlipAverage(nn.Module):
    """Flip test-time augmentation around a CNN: the mean of the logits of each image and
    of its mirror image (flipped left to right), ``(f(x) + f(flip(x))) * 0.5``; the JAX
    port's ``steps.eval_logits`` with ``tta="flip"`` computes the same. Holds no state of
    its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(torch.flip(x, dims=(3,)))) * 0.5


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """``model`` as a run with test-time augmentation ``tta`` ("none" | "flip") evaluates it."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}")
    return FlipAverage(model) if tta == "flip" else model


def build_model(name: str, dropout_p: float | None = None) -> nn.Module:
    """An untrained model ("baseline" | "dropout" | "v3" | "net4") with PyTorch's default
    init drawn from torch's global RNG (use ``init_model`` for a seeded one)."""
    if name in MODELS and cnn_layout(name) == "net4":
        return Net4(dropout_p)
    return CifakeCNN(name, dropout_p)


def init_model(name: str, seed: int, dropout_p: float | None = None) -> nn.Module:
    """``name`` with the family's seeded initial weights (``core.init.cnn_init``: PyTorch's
    default distributions drawn with NumPy), the same arrays the JAX port starts from.

    Torch's global RNG is forked, so building the module does not disturb it.
    """
    with torch.random.fork_rng(devices=[]):
        model = build_model(name, dropout_p)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in cnn_init(name, seed).items()})
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "DROPOUT_P", "CifakeCNN", "Net4", "FlipAverage", "with_tta", "build_model",
           "init_model", "param_count"]
