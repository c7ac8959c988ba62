"""TFDS packaging of CIFAKE (``cifake``), built and served without TensorFlow.

    from data.tfds_cifake import load_data_source
    ds = load_data_source("cifake.zip", "/tmp/tfds")   # {'train': ..., 'test': ...}
    ex = ds["train"][0]   # {'image': (32,32,3) uint8, 'label': 0|1, 'file_name': bytes,
                          #  'cifar_class': int}

Importing this package registers the builder under the name ``cifake``, so
``tfds.data_source("cifake", data_dir=..., builder_kwargs={"archive": ZIP})`` or,
with the zip in TFDS's manual dir, ``download_and_prepare_kwargs={"download_config":
tfds.download.DownloadConfig(manual_dir=DIR)}`` work too.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from ..source import open_source

try:
    import tensorflow_datasets as tfds
except ImportError:  # optional extra: pip install "cifake-detector[tfds]"
    tfds = None

if tfds is not None:
    from .cifake_dataset_builder import Builder, find_archive  # noqa: F401  (registers 'cifake')

NAME = "cifake"


def load_data_source(zip_path: str | os.PathLike, data_dir: str | os.PathLike,
                     verbose: bool = False) -> dict:
    """Build (once) the ``cifake`` TFDS dataset from ``zip_path`` into ``data_dir``
    and return ``{"train": source, "test": source}``: random-access sequences of
    example dicts (``len(src)``, ``src[i]``, ``src.__getitems__([i, j])`` for a batch).

    A ``data_dir`` already holding ``cifake`` built from another archive (or
    from this path before its contents changed) is an error rather than stale data.
    """
    if tfds is None:
        raise DataError("the TFDS builder needs tensorflow-datasets and array-record: "
                        "pip install 'cifake-detector[tfds]'")
    zip_path = Path(zip_path).expanduser()
    if not zip_path.is_file():
        raise DataError(f"{zip_path}: no such archive")
    zip_path = zip_path.resolve()
    src = open_source(zip_path)  # a non-zip fails here, with data.source's message
    if not verbose:
        tfds.disable_progress_bar()  # TFDS's switch is process-wide
    builder = tfds.builder(NAME, data_dir=str(data_dir), archive=str(zip_path))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(zip_path.parent)))
    built = dict(builder.info.metadata.get("source") or {})
    want = {"path": str(zip_path), "digest": src.digest()}
    src.close()
    if built != want:
        raise DataError(f"{builder.data_dir}: holds cifake built from {built.get('path')!r} "
                        f"with other contents than {zip_path}; use another data_dir or delete it")
    return builder.as_data_source()
