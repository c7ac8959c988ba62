"""TFDS builder ``cifake``: the Kaggle CIFAKE zip as a TensorFlow Datasets dataset.

It needs ``tensorflow-datasets`` and ``array-record`` but not TensorFlow: the
examples are written as ``array_record`` files and served as random-access
``tfds.data_source`` sequences of NumPy dicts (no ``tf.data``).

The archive is read through ``data.source`` (same layout checks, same zip-slip
refusal, nothing extracted to disk) and every image is decoded and validated by
``data.images.decode_dataset_image``, so the dataset holds exactly the pixels,
labels and names that ``data.load_cifake`` returns. The decoded RGB image is
stored re-encoded as PNG (lossless), so reading it back gives those same pixels.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ..errors import DataError
from ..images import SIZE, decode_dataset_image
from ..source import CLASSES, LABEL_OF, SPLITS, Source, cifar_class_of, open_source

# The archive TFDS looks for in the manual dir first; any other *.zip with the
# layout is accepted when it is the only one there.
ARCHIVE_NAME = "cifake.zip"


def find_archive(manual_dir: Path) -> Path:
    """The CIFAKE zip inside ``manual_dir``: ``cifake.zip``, else the only ``*.zip``."""
    manual_dir = Path(manual_dir)
    preferred = manual_dir / ARCHIVE_NAME
    if preferred.is_file():
        return preferred
    zips = sorted(p for p in manual_dir.glob("*.zip") if p.is_file())
    if len(zips) == 1:
        return zips[0]
    if not zips:
        raise DataError(f"{manual_dir}: no {ARCHIVE_NAME} (or other *.zip) in the TFDS manual "
                        f"dir; see the cifake builder's MANUAL_DOWNLOAD_INSTRUCTIONS")
    raise DataError(f"{manual_dir}: several zips and none named {ARCHIVE_NAME}: "
                    f"{', '.join(p.name for p in zips)}")


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


class Builder(tfds.core.GeneratorBasedBuilder):
    """CIFAKE: 32x32 REAL (CIFAR-10) vs FAKE (Stable Diffusion) images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Kaggle release; label FAKE = 0, REAL = 1."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download the Kaggle archive (birdy654/cifake-real-and-ai-generated-synthetic-images,
    https://www.kaggle.com/datasets/birdy654/cifake-real-and-ai-generated-synthetic-images)
    and place it, unextracted, in the manual dir as `{ARCHIVE_NAME}` (any single `*.zip`
    with the layout train|test/REAL|FAKE/*.jpg, optionally below one wrapper folder, works).
    With data.tfds_cifake.load_data_source(zip_path, data_dir) you pass the zip directly.
    """

    # tensorflow-datasets 4.9.10's DatasetBuilder.code_path evaluates
    # ``isinstance(path, importlib_resources.abc.Traversable)`` for any builder
    # living in a regular package, but declares the ``importlib_resources``
    # backport only for Python < 3.9, so on 3.11 it dies with
    # ModuleNotFoundError. Our code path is simply this file.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        from etils import epath
        return epath.Path(__file__)

    def __init__(self, *, archive: str | None = None, **kwargs):
        # ``archive``: the zip to build from, overriding the manual-dir lookup
        # (builder_kwargs={"archive": path} in tfds.builder / tfds.data_source).
        self._archive = Path(archive) if archive else None
        # array_record: random access without TensorFlow (tfrecord reading needs tf.data)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__.split("\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3), dtype=np.uint8,
                                             encoding_format="png"),
                "label": tfds.features.ClassLabel(names=list(CLASSES)),  # FAKE = 0, REAL = 1
                # 'REAL/1234 (3).jpg', as Split.names in data.load_cifake
                "file_name": tfds.features.Text(),
                # CIFAR-10 class 1..10 from the file name, 0 = unknown (data.source.cifar_class_of)
                "cifar_class": tfds.features.Scalar(dtype=np.uint8),
            }),
            supervised_keys=("image", "label"),
            # filled at build time: which archive (path + content fingerprint) it came from
            metadata=tfds.core.MetadataDict(),
            homepage="https://www.kaggle.com/datasets/birdy654/"
                     "cifake-real-and-ai-generated-synthetic-images",
            citation="Bird, J.J., Lotfi, A. (2024). CIFAKE: Image Classification and Explainable "
                     "Identification of AI-Generated Synthetic Images. IEEE Access.",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        archive = self._archive or find_archive(Path(dl_manager.manual_dir))
        src = open_source(archive.expanduser().resolve())
        entries = src.entries()  # validates the whole layout before anything is written
        self.info.metadata["source"] = {"path": str(src.path), "digest": src.digest()}
        return {split: self._generate_examples(src, [e for e in entries if e.split == split])
                for split in SPLITS}

    def _generate_examples(self, src: Source, entries):
        for e in entries:
            rgb = decode_dataset_image(src.read(e.key), f"{src.path}:{e.key}")
            name = f"{e.cls}/{e.name}"
            yield f"{e.split}/{name}", {
                "image": _png(rgb),
                "label": LABEL_OF[e.cls],
                "file_name": name,
                "cifar_class": cifar_class_of(e.name),
            }
