"""Decode CIFAKE once into uint8 NHWC arrays and cache them with a manifest.

Cache layout (format version ``FORMAT_VERSION``)::

    <cache-dir>/<source-key>/
        manifest.json            format version, source path + fingerprint, counts
        train_images.npy         (N, 32, 32, 3) uint8, RGB, NHWC
        train_labels.npy         (N,) uint8, FAKE = 0, REAL = 1
        train_cifar_class.npy    (N,) uint8, CIFAR-10 class 1..10 from the file name (0 = unknown)
        train_digests.npy        (N,) |S20, SHA-1 of the file's bytes (for duplicate/leak checks)
        train_names.npy          (N,) <U.., 'REAL/1234 (3).jpg'
        test_*.npy               the same for the test split

Only plain ``.npy`` (loaded with ``allow_pickle=False``) and JSON: nothing is
unpickled. The folder is built under a temporary name and renamed into place
when complete, so an interrupted build never leaves a cache that loads. A cache
whose manifest disagrees with its source (format version, fingerprint) is
rebuilt, with a message saying why. The manifest records each array's shape, dtype
and CRC-32, and every load checks them (and the per-class counts against the labels):
an edited or damaged array is refused, never trained on. One process at a time checks,
builds and loads a given cache (an exclusive ``flock`` on ``<key>.lock`` beside it), so
concurrent builders wait for each other and the second one finds the cache ready.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import zlib
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .images import SIZE, decode_dataset_image
from .source import CLASSES, LABEL_OF, SPLITS, Entry, Source, cifar_class_of, open_source, \
    resolve_path

# 2: the manifest holds each array's shape, dtype and CRC-32 ("arrays"), checked on load
FORMAT_VERSION = 2
# Images per decoding task: large enough to amortise inter-process traffic, small
# enough for a live progress count. Worker processes are used only from 4 tasks on.
DECODE_CHUNK = 2000
_FIELDS = ("images", "labels", "cifar_class", "digests", "names")


@dataclass
class Split:
    """One split, every array aligned on axis 0."""
    images: np.ndarray       # (N, 32, 32, 3) uint8 RGB
    labels: np.ndarray       # (N,) uint8: FAKE = 0, REAL = 1
    cifar_class: np.ndarray  # (N,) uint8: 1..10, 0 = unknown
    digests: np.ndarray      # (N,) S20: SHA-1 of the source file's bytes
    names: np.ndarray        # (N,) str: 'CLASS/file name'

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray) -> "Split":
        return Split(*(getattr(self, f)[idx] for f in _FIELDS))

    def subset_per_class(self, n: int | None) -> "Split":
        """The first ``n`` images of each class (in file-name order), for quick runs."""
        if n is None:
            return self
        if n <= 0:
            raise DataError(f"--subset must be a positive number of images per class, got {n}")
        idx = np.concatenate([np.flatnonzero(self.labels == c)[:n] for c in range(len(CLASSES))])
        return self.take(np.sort(idx))


@dataclass
class CIFAKE:
    train: Split
    test: Split
    manifest: dict
    val: Split | None = None  # training images held out (data.validation), when a run asks

    def test_deduplicated(self) -> Split:
        """The test split minus every image whose bytes also occur in train (the leak)."""
        leaked = np.isin(self.test.digests, self.train.digests)
        return self.test.take(np.flatnonzero(~leaked))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cifake-detector"


def _source_key(path: Path) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- decoding
_WORKER_SOURCE: Source | None = None


def _worker_init(path: str) -> None:
    # No src.open(): members are read through the locators the parent computed
    # (Source.locate), so a worker never re-reads the archive's directory.
    global _WORKER_SOURCE
    _WORKER_SOURCE = open_source(Path(path))


def _decode_chunk(args: tuple[str, list[str], list]) -> tuple[np.ndarray, list[bytes]]:
    path, keys, locs = args
    src = _WORKER_SOURCE if _WORKER_SOURCE is not None else open_source(Path(path))
    out = np.empty((len(keys), SIZE, SIZE, 3), np.uint8)
    digests = []
    for i, (key, loc) in enumerate(zip(keys, locs)):
        raw = src.read_located(key, loc)
        out[i] = decode_dataset_image(raw, f"{path}:{key}" if src.kind == "zip" else key)
        digests.append(hashlib.sha1(raw).digest())
    return out, digests


def _decode_all(src: Source, entries: list[Entry], workers: int, progress: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    keys = [e.key for e in entries]
    n = len(keys)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    digests = np.empty((n,), "S20")
    chunk = DECODE_CHUNK
    locs = src.locate(keys)
    tasks = [(str(src.path), keys[i:i + chunk], locs[i:i + chunk]) for i in range(0, n, chunk)]
    done = 0
    t0 = time.time()

    def store(i: int, res: tuple[np.ndarray, list[bytes]]) -> None:
        nonlocal done
        a, d = res
        images[i * chunk:i * chunk + len(a)] = a
        digests[i * chunk:i * chunk + len(a)] = d
        done += len(a)
        if progress:
            print(f"\r  decoded {done:,}/{n:,} images ({time.time() - t0:.1f} s)", end="",
                  file=sys.stderr, flush=True)

    if workers <= 1 or n < 4 * chunk:
        src.open()
        global _WORKER_SOURCE
        prev, _WORKER_SOURCE = _WORKER_SOURCE, src
        try:
            for i, t in enumerate(tasks):
                store(i, _decode_chunk(t))
        finally:
            _WORKER_SOURCE = prev
    else:
        # "spawn", not fork: the caller may already run JAX's or torch's threads, which a
        # fork would copy in an undefined state (JAX warns of deadlocks)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_worker_init, initargs=(str(src.path),)) as ex:
            for i, res in enumerate(ex.map(_decode_chunk, tasks)):
                store(i, res)
    if progress:
        print(file=sys.stderr)
    return images, digests


# ---------------------------------------------------------------- build / load
def _crc32(arr: np.ndarray) -> int:
    """CRC-32 of an array's bytes: ~0.1 s for the 368 MB of full-CIFAKE images, cheap
    enough to check on every load. It guards against damage and edits, not attackers."""
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B"))


def _describe(arr: np.ndarray) -> dict:
    return {"shape": list(arr.shape), "dtype": arr.dtype.str, "crc32": _crc32(arr)}


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _cache_lock(target: Path, verbose: bool):
    """Hold an exclusive lock on ``<target>.lock`` while checking, building and loading
    one cache: two builders of the same cache would otherwise replace each other's
    folder while the other was reading it. The holder deletes the lock file on exit, so
    nothing is left beside the caches; a waiter that wakes up on a deleted file starts
    over. A cache folder that cannot hold a lock file (read-only, shared) is used
    without one: nobody can rebuild it there either."""
    lock = target.with_name(target.name + ".lock")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    said = False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if verbose and not said:
                    print(f"waiting for another process building or loading the cache "
                          f"{target}", file=sys.stderr, flush=True)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # we hold the lock file that is in place
        except FileNotFoundError:
            pass  # the previous holder deleted it as we waited: take the next one
        except OSError:  # a file system without flock: go on unlocked
            os.close(fd)
            yield
            return
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)  # releases the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or an absurd number): leave its folder alone
    return True


def _remove_dead_builds(target: Path) -> None:
    """Delete ``<target>.tmp-PID`` / ``.old-PID`` folders left by a build that was
    killed (kill -9, out of memory): never loaded, but up to 400 MB each on the full set."""
    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f"{target.name}.*-*"):
        tag, _, pid = p.name[len(target.name) + 1:].partition("-")
        if tag in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def build_cache(src: Source, target: Path, workers: int | None = None, progress: bool = True
                ) -> dict:
    """Decode every image of ``src`` into ``target`` (atomically). Returns the manifest."""
    t0 = time.time()
    entries = src.entries()
    workers = workers or min(os.cpu_count() or 1, 8)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    _remove_dead_builds(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DataError(f"cannot create cache folder {tmp.parent} ({e.strerror}); "
                        f"choose another with --cache-dir") from None
    try:
        images, digests = _decode_all(src, entries, workers, progress)
        counts = {}
        described: dict[str, dict] = {}
        for split in SPLITS:
            sel = [i for i, e in enumerate(entries) if e.split == split]
            lo, hi = sel[0], sel[-1] + 1
            assert hi - lo == len(sel), "entries are grouped by split"
            es = entries[lo:hi]
            arrays = {
                "images": images[lo:hi],
                "labels": np.array([LABEL_OF[e.cls] for e in es], np.uint8),
                "cifar_class": np.array([cifar_class_of(e.name) for e in es], np.uint8),
                "digests": digests[lo:hi],
                "names": np.array([f"{e.cls}/{e.name}" for e in es]),
            }
            for field, arr in arrays.items():
                _write_npy(tmp / f"{split}_{field}.npy", arr)
                described[f"{split}_{field}.npy"] = _describe(arr)
            counts[split] = {c: int(sum(e.cls == c for e in es)) for c in CLASSES}
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": {"path": str(src.path), "kind": src.kind, **src.stat_key(),
                       "digest": src.digest()},
            "counts": counts,
            "ignored_files": len(src.ignored),
            "label_convention": {c: LABEL_OF[c] for c in CLASSES},
            "arrays": described,
            "build_seconds": round(time.time() - t0, 2),
        }
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        # replace atomically: an old cache is moved aside first, then deleted
        if target.exists():
            old = target.with_name(f"{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk or quota mid-build; reading errors are DataErrors
            raise DataError(f"cannot write the cache in {tmp.parent} ({e.strerror or e}); "
                            f"nothing was kept; free some space or choose another folder with "
                            f"--cache-dir") from None
        raise
    return manifest


def _read_manifest(target: Path) -> dict | None:
    try:
        with open(target / "manifest.json") as f:
            m = json.load(f)
        return m if isinstance(m, dict) else None
    except (OSError, ValueError, RecursionError):  # deep nesting: RecursionError
        return None


def _stale_reason(m: dict | None, src: Source) -> str | None:
    """None when the cache matches the source, else why it does not."""
    if m is None:
        return "no complete cache yet"
    if m.get("format_version") != FORMAT_VERSION:
        return f"cache format {m.get('format_version')} != {FORMAT_VERSION}"
    s = m.get("source", {})
    if s.get("path") != str(src.path) or s.get("kind") != src.kind:
        return "cache was built from another source"
    if src.kind == "zip":
        sk = src.stat_key()
        if s.get("size") == sk["size"] and s.get("mtime_ns") == sk["mtime_ns"]:
            return None  # same file, untouched: skip reading the archive index
    if s.get("digest") != src.digest():
        return "the source's contents changed since the cache was built"
    return None


def _load_split(target: Path, split: str, m: dict) -> Split:
    described = m.get("arrays") or {}
    arrays = []
    for field in _FIELDS:
        p = target / f"{split}_{field}.npy"
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: unreadable cache file ({e}); delete the folder {target} "
                            f"to rebuild it") from None
        want = described.get(p.name)
        if not isinstance(want, dict) or {"shape": list(arr.shape), "dtype": arr.dtype.str} \
                != {k: want.get(k) for k in ("shape", "dtype")} or _crc32(arr) != want.get("crc32"):
            raise DataError(f"{p}: cache file does not match its manifest (checksum, shape or "
                            f"dtype): damaged or edited; delete the folder {target} to rebuild it")
        arrays.append(arr)
    s = Split(*arrays)
    n = len(s.labels)
    if s.images.shape != (n, SIZE, SIZE, 3) or s.images.dtype != np.uint8 or any(
            len(getattr(s, f)) != n for f in _FIELDS):
        raise DataError(f"{target}: cache arrays for '{split}' have inconsistent shapes; "
                        f"delete the folder to rebuild it")
    counts = {c: int((s.labels == LABEL_OF[c]).sum()) for c in CLASSES}
    if counts != (m.get("counts") or {}).get(split) or sum(counts.values()) != n:
        raise DataError(f"{target / 'manifest.json'}: counts for '{split}' disagree with the "
                        f"labels ({counts}); damaged or edited; delete the folder {target} to "
                        f"rebuild it")
    return s


def prepare(data: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
            verbose: bool = True, workers: int | None = None) -> tuple[Path, dict, Source]:
    """Make sure a valid cache exists for the source; returns (cache folder, manifest, source)."""
    path, src, target = _locate(data, cache_dir)
    with _cache_lock(target, verbose):
        m = _ensure_built(path, src, target, verbose, workers)
    return target, m, src


def _locate(data, cache_dir) -> tuple[Path, Source, Path]:
    path = resolve_path(data)
    src = open_source(path)
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return path, src, base / _source_key(path)


def _ensure_built(path: Path, src: Source, target: Path, verbose: bool, workers: int | None
                  ) -> dict:
    m = _read_manifest(target)
    reason = _stale_reason(m, src)
    if reason is not None:
        if verbose:
            print(f"building CIFAKE cache from {path} ({reason}) -> {target}", file=sys.stderr)
        m = build_cache(src, target, workers=workers, progress=verbose)
    assert m is not None
    return m


def load_cifake(data: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                subset: int | None = None, verbose: bool = True,
                allow_test_inside_train: bool = False) -> CIFAKE:
    """Load CIFAKE as uint8 arrays, building the cache first when needed.

    ``subset``: keep the first N images per class in each split (quick runs).
    A dataset whose every test image also occurs in train (byte-identical) is refused
    unless ``allow_test_inside_train`` (the data.prepare report): its de-duplicated test
    view is empty, so a training run could never be evaluated.
    """
    path, src, target = _locate(data, cache_dir)
    with _cache_lock(target, verbose):
        m = _ensure_built(path, src, target, verbose, None)
        src.close()
        ds = CIFAKE(_load_split(target, "train", m), _load_split(target, "test", m), m)
    if subset is not None:
        ds = CIFAKE(ds.train.subset_per_class(subset), ds.test.subset_per_class(subset), m)
    if not allow_test_inside_train and len(ds.test) and \
            np.isin(ds.test.digests, ds.train.digests).all():
        raise DataError(f"{path}: every one of the {len(ds.test):,} test images"
                        f"{' (of this --subset)' if subset is not None else ''} is a "
                        f"byte-identical copy of a train image, so the de-duplicated test view "
                        f"is empty and no run could be evaluated; use a test split of its own")
    return ds


def content_fingerprint(manifest: dict) -> str:
    """What a run was trained and evaluated on, as one hex digest: the decoded images' and
    labels' shapes and CRC-32s of both splits (from the manifest, so free to compute). It
    follows the pixels, not the container: the same images from a zip or from its extracted
    folder give the same fingerprint; one changed image gives another."""
    described = manifest.get("arrays") or {}
    names = [f"{s}_{f}.npy" for s in SPLITS for f in ("images", "labels")]
    missing = [n for n in names if n not in described]
    if missing:
        raise DataError(f"cache manifest has no description of {missing[0]}")
    h = hashlib.sha256()
    for n in names:
        d = described[n]
        h.update(f"{n}\0{d['shape']}\0{d['dtype']}\0{d['crc32']}\n".encode())
    return h.hexdigest()


def duplicate_count(digests: np.ndarray) -> int:
    """Number of files that are byte-identical copies of an earlier file in the same split."""
    return int(len(digests) - len(np.unique(digests)))
