"""The one CIFAKE data layer shared by numpy_mlp, torch_cnn and jax_port.

Label convention (every stack): FAKE = 0, REAL = 1 -- the alphabetical class
order torchvision's ImageFolder uses. Images are uint8 RGB, NHWC (N, 32, 32, 3);
stacks scale them to [0, 1] as pixels / 255.
"""
from .batching import (PAD, AugDraws, augment, augment_draws, batch_slices, epoch_order,
                       identity_draws, num_batches, to_float)
from .cache import CIFAKE, Split, duplicate_count, load_cifake, prepare
from .errors import DataError, UserError, run_cli
from .images import load_image_for_model
from .source import CLASSES, LABEL_OF

__all__ = ["PAD", "AugDraws", "augment", "augment_draws", "batch_slices", "epoch_order",
           "identity_draws", "num_batches", "to_float", "CIFAKE", "Split", "duplicate_count",
           "load_cifake", "prepare", "DataError", "UserError", "run_cli", "load_image_for_model",
           "CLASSES", "LABEL_OF"]
