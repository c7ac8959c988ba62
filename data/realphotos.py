"""A second, tiny image set: the genuine photographs that installed packages ship
(scikit-image's data folder, matplotlib's sample data), which the real-photo evaluation
(``cifake.realworld``) and the photo study (``bench.photo.study``) score. Nothing is
downloaded: a photo missing from the installed package is a one-line error."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import DataError
from .images import read_file_bounded


@dataclass(frozen=True)
class Photo:
    package: str   # the installed package that ships the file
    path: str      # relative to the package's data folder
    what: str
    colour: bool   # CIFAKE is all colour: grayscale photos are reported apart too


# scikit-image's data folder: every genuine photograph it ships. Left out, and why:
# cell.png (a phase image reconstructed from a hologram), clock_motion.png (motion blur
# added on purpose), color.png, chessboard_*.png, phantom.png (synthetic), horse.png and
# logo.png (drawings), ihc.png (microscope slide), microaneurysms.png (a 102x102 crop of
# one colour channel), text.png (unclear origin), multipage*.tif and the GIF (tiny test
# files), lfw_subset.npy and motorcycle_disp.npz (arrays, not image files).
SKIMAGE = [
    ("astronaut.png", "portrait of astronaut Eileen Collins", True),
    ("brick.png", "brick wall texture", False),
    ("camera.png", "man with a camera (cameraman)", False),
    ("chelsea.png", "Chelsea the cat", True),
    ("coffee.png", "coffee cup", True),
    ("coins.png", "Greek coins from Pompeii", False),
    ("grass.png", "grass texture", False),
    ("gravel.png", "gravel texture", False),
    ("hubble_deep_field.jpg", "Hubble eXtreme Deep Field (telescope)", True),
    ("moon.png", "surface of the moon", False),
    ("motorcycle_left.png", "motorcycle, left stereo view", True),
    ("motorcycle_right.png", "motorcycle, right stereo view", True),
    ("page.png", "scanned page of printed text", False),
    ("retina.jpg", "fundus photograph of a retina", True),
    ("rocket.jpg", "Falcon 9 launch of DSCOVR", True),
]
PHOTOS: list[Photo] = ([Photo("skimage", f, w, c) for f, w, c in SKIMAGE]
                       # matplotlib's sample data: its one photograph (the others are a
                       # clip-art PNG, the logo and data files)
                       + [Photo("matplotlib", "sample_data/grace_hopper.jpg",
                                "portrait of Grace Hopper", True)])


def package_data_dir(package: str) -> Path:
    """The data folder of an installed package, or a one-line error saying how to install it."""
    if package == "skimage":
        try:
            import skimage
        except ImportError:
            raise DataError("scikit-image is not installed: pip install "
                            "'cifake-detector[realworld]' (its data/ folder holds the photos)") \
                from None
        return Path(skimage.__file__).parent / "data"
    if package == "matplotlib":
        try:
            import matplotlib
        except ImportError:
            raise DataError("matplotlib is not installed: pip install "
                            "'cifake-detector[bench]'") from None
        return Path(matplotlib.get_data_path())
    raise ValueError(f"unknown photo package {package!r}")


def photo_path(p: Photo) -> Path:
    return package_data_dir(p.package) / p.path


def load_photo(p: Photo) -> Image.Image:
    """The photo as a loaded Pillow image (its own mode and size), or a one-line error."""
    path = photo_path(p)
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {p.package} (this version of "
                        f"the package does not ship it)")
    data = read_file_bounded(str(path))  # refuses anything over MAX_FILE_BYTES
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return im
