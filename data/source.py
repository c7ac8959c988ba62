"""Where CIFAKE comes from: the Kaggle zip, the same tree extracted, or kagglehub.

Layout (the Kaggle archive as downloaded)::

    train/REAL/*.jpg  train/FAKE/*.jpg  test/REAL/*.jpg  test/FAKE/*.jpg

optionally below one wrapper folder (``cifake/train/...``), which is detected.

Policy for files that do not fit the layout (documented in README):
- OS metadata (``__MACOSX/``, ``.DS_Store``, ``Thumbs.db``, ``desktop.ini``,
  names starting with ``._``) is ignored silently;
- any other file outside ``train|test/REAL|FAKE/`` (a README, a licence) is
  ignored and counted, and ``python -m data.prepare`` reports the count;
- inside a class folder every regular file must be an image with extension
  .jpg/.jpeg/.png/.webp/.bmp; anything else is an error naming the file, as
  is a sub-folder inside a class folder;
- a missing split or class folder, or an empty class, is an error.

Archive entries are never extracted to disk. Names containing ``..``, an
absolute path, a drive letter or a backslash are refused before anything is read, as is
an archive whose directory lists two names for overlapping bytes (a zip bomb's trick:
one member read once per name) or a name its member's own header does not carry. Each
member is inflated to at most its declared size, so the bytes decompressed from an
archive never exceed the sum of its members' declared sizes.
"""
from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from .errors import DataError
from .images import MAX_FILE_BYTES, read_file_bounded

SPLITS = ("train", "test")
# Alphabetical order, as torchvision's ImageFolder assigns indices: FAKE = 0, REAL = 1.
CLASSES = ("FAKE", "REAL")
LABEL_OF = {c: i for i, c in enumerate(CLASSES)}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
KAGGLE_HANDLE = "birdy654/cifake-real-and-ai-generated-synthetic-images"
_OS_JUNK = {".ds_store", "thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Entry:
    """One image file of the dataset."""
    split: str   # "train" | "test"
    cls: str     # "FAKE" | "REAL"
    name: str    # file name inside the class folder, e.g. "1234 (3).jpg"
    key: str     # how the source reads it: the zip member name or a filesystem path


def _is_os_junk(parts: tuple[str, ...]) -> bool:
    return any(p == "__MACOSX" or p.lower() in _OS_JUNK or p.startswith("._") for p in parts)


def posix_parts(rel: str) -> tuple[str, ...]:
    """``PurePosixPath(rel).parts`` for a relative path, without its per-call cost
    (it is called for each of the 120,000 entries): empty and '.' components dropped."""
    return tuple(p for p in rel.split("/") if p and p != ".")


def check_member_name(name: str, archive: str) -> None:
    """Refuse archive member names that could escape a folder (zip-slip)."""
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: archive entry has an absolute or non-POSIX path: {name!r}")
    if ".." in name.split("/"):
        raise DataError(f"{archive}: archive entry has '..' in its path: {name!r}")


def cifar_class_of(name: str) -> int:
    """CIFAR-10 class index 1..10 from a file name: 'NNNN.jpg' -> 1, 'NNNN (k).jpg' -> k.

    Returns 0 when the name does not follow the convention (a user's own files).
    """
    stem = name.rsplit(".", 1)[0]
    if stem.endswith(")") and " (" in stem:
        k = stem.rsplit(" (", 1)[1][:-1]
        return int(k) if k.isdigit() and 1 <= int(k) <= 10 else 0
    return 1 if stem.isdigit() else 0


def natural_key(name: str) -> tuple:
    """Sort '2.jpg' before '10.jpg' and '5.jpg' before '5 (2).jpg'."""
    stem = name.rsplit(".", 1)[0]
    num, _, rest = stem.partition(" ")
    return (0, int(num), cifar_class_of(name), name) if num.isdigit() else (1, 0, 0, name)


class Source:
    """Lists the dataset's entries and reads their bytes. Subclasses: ZipSource, DirSource."""
    kind = "?"

    def __init__(self, path: Path):
        self.path = path
        self.ignored: list[str] = []   # files outside the layout, reported by data.prepare

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def locate(self, keys: list[str]) -> list:
        """Per key, a small picklable locator that lets ``read_located`` in another
        process fetch the bytes without re-listing the source (None: use ``read``)."""
        return [None] * len(keys)

    def read_located(self, key: str, loc) -> bytes:
        return self.read(key)

    def stat_key(self) -> dict:
        """Cheap identity (size, mtime) used to skip recomputing the digest."""
        raise NotImplementedError

    def digest(self) -> str:
        """Content fingerprint of the listing (names, sizes, CRCs or mtimes)."""
        raise NotImplementedError

    def open(self) -> None:
        """(Re)open handles; called in each decoding worker process."""

    def close(self) -> None:
        pass

    # shared by both sources: group relative paths into validated entries
    def _collect(self, rel_paths: list[tuple[str, str, bool]]) -> list[Entry]:
        """rel_paths: (relative POSIX path, key, is_dir). Returns sorted entries."""
        parts_list = [(posix_parts(r), k, d) for r, k, d in rel_paths]
        parts_list = [(p, k, d) for p, k, d in parts_list if p and not _is_os_junk(p)]
        prefix: tuple[str, ...] = ()
        tops = {p[0] for p, _, _ in parts_list}
        if not (tops & set(SPLITS)):
            # one wrapper folder, e.g. "cifake/train/REAL/..."
            wrappers = {p[0] for p, _, d in parts_list if len(p) > 1 or d}
            if len(wrappers) == 1:
                prefix = (next(iter(wrappers)),)
        groups: dict[tuple[str, str], list[Entry]] = {(s, c): [] for s in SPLITS for c in CLASSES}
        for parts, key, is_dir in parts_list:
            if parts[:len(prefix)] != prefix:
                self.ignored.append("/".join(parts))
                continue
            rel = parts[len(prefix):]
            if len(rel) < 2 or rel[0] not in SPLITS or rel[1] not in CLASSES:
                if not is_dir:
                    self.ignored.append("/".join(parts))
                continue
            if len(rel) == 2:
                continue  # the class folder itself
            if len(rel) > 3 or is_dir:
                raise DataError(f"{self.path}: unexpected sub-folder inside a class folder: "
                                f"{'/'.join(parts)}")
            name = rel[2]
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                raise DataError(f"{self.path}: not an image file (extension) in a class folder: "
                                f"{'/'.join(parts)}")
            groups[(rel[0], rel[1])].append(Entry(rel[0], rel[1], name, key))
        present_splits = {s for (s, c), v in groups.items() if v}
        for s in SPLITS:
            folder_seen = any(p[len(prefix):][:1] == (s,) for p, _, _ in parts_list)
            if not folder_seen:
                raise DataError(f"{self.path}: missing split folder '{'/'.join(prefix + (s,))}/' "
                                f"(expected train|test/REAL|FAKE/*.jpg)")
            for c in CLASSES:
                cls_seen = any(p[len(prefix):][:2] == (s, c) for p, _, _ in parts_list)
                if not cls_seen:
                    raise DataError(f"{self.path}: missing class folder "
                                    f"'{'/'.join(prefix + (s, c))}/'")
                if not groups[(s, c)]:
                    raise DataError(f"{self.path}: class folder '{'/'.join(prefix + (s, c))}/' "
                                    f"holds no images")
        del present_splits
        out: list[Entry] = []
        for s in SPLITS:
            for c in CLASSES:
                out.extend(sorted(groups[(s, c)], key=lambda e: natural_key(e.name)))
        return out


# A zip member's local file header (APPNOTE 4.3.7): signature, version, flags,
# method, time, date, CRC-32, compressed size, size, name length, extra length.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


def _inflate(raw: bytes, limit: int) -> bytes:
    return zlib.decompressobj(-15).decompress(raw, limit)  # raw deflate, no zlib header


def _bunzip(raw: bytes, limit: int) -> bytes:
    return bz2.BZ2Decompressor().decompress(raw, limit)


def _unlzma(raw: bytes, limit: int) -> bytes:
    """A zip's LZMA member: 2-byte version, 2-byte property size, the LZMA1 properties
    (lc/lp/pb byte + 4-byte dictionary size), then the raw stream (APPNOTE 5.8.8)."""
    if len(raw) < 9:
        raise ValueError("LZMA header truncated")
    psize = struct.unpack("<H", raw[2:4])[0]
    props = raw[4:4 + psize]
    if psize != 5 or len(props) != 5 or props[0] >= 9 * 5 * 5:
        raise ValueError("bad LZMA properties")
    pb, rest = divmod(props[0], 9 * 5)
    lp, lc = divmod(rest, 9)
    filt = {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb,
            "dict_size": struct.unpack("<I", props[1:5])[0]}
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[filt]).decompress(raw[4 + psize:],
                                                                             limit)


# method code -> f(compressed bytes, max output bytes); the four methods zipfile writes
_DECOMPRESSORS = {zipfile.ZIP_STORED: lambda raw, limit: raw, zipfile.ZIP_DEFLATED: _inflate,
                  zipfile.ZIP_BZIP2: _bunzip, zipfile.ZIP_LZMA: _unlzma}


def _raw_name(name: str, flags: int) -> bytes:
    """A member's name as the central directory stores it: zipfile decodes it as UTF-8
    when its flags say so, else as cp437, and both encode back to the same bytes."""
    return name.encode("utf-8" if flags & 0x800 else "cp437")


def _member_ends(infos: list[zipfile.ZipInfo], directory: int, archive: str) -> dict[str, int]:
    """Member name -> the offset where the next member (or the central directory) begins.

    Refuses an archive in which two members' bytes overlap: several names for the same
    bytes make a small archive inflate to gigabytes, one copy per name (a non-recursive
    zip bomb). A member spans at least its local header, its name and its compressed data;
    the exact span, with the local extra field, is checked when it is read."""
    order = sorted(infos, key=attrgetter("header_offset"))
    nexts = [i.header_offset for i in order[1:]] + [directory]
    bad = next((k for k, (i, nxt) in enumerate(zip(order, nexts)) if i.header_offset
                + _LOCAL_HEADER.size + len(i.orig_filename) + i.compress_size > nxt), None)
    if bad is not None:
        other = repr(order[bad + 1].filename) if bad + 1 < len(order) else "the central directory"
        raise DataError(f"{archive}: archive entry {order[bad].filename!r} overlaps {other} "
                        f"(one member's bytes listed under several names: a crafted archive, "
                        f"e.g. a zip bomb); re-create the zip")
    return {i.filename: nxt for i, nxt in zip(order, nexts)}


class ZipSource(Source):
    kind = "zip"

    def __init__(self, path: Path):
        super().__init__(path)
        self._zf: zipfile.ZipFile | None = None
        self._infos: dict[str, zipfile.ZipInfo] | None = None
        self._ends: dict[str, int] = {}  # member name -> where the next member begins
        self._fh = None  # plain file handle for read_located

    def locate(self, keys: list[str]) -> list:
        """(local header offset, compressed size, method, CRC-32, size, flags, the name in
        the central directory, where the next member begins) per member.

        Every member is read with these from one plain file handle, by ``read_located``:
        opening a ``ZipFile`` in each decoding worker would re-read and re-check the
        120,000-entry central directory there (about 1.5 s of CPU each), and
        ``zipfile.read`` inflates bzip2/LZMA members whole, whatever size they declare.
        """
        infos, ends = self._info(), self._ends
        return [(i.header_offset, i.compress_size, i.compress_type, i.CRC, i.file_size,
                 i.flag_bits, i.orig_filename, ends[k]) for k, i in ((k, infos[k]) for k in keys)]

    def read_located(self, key: str, loc) -> bytes:
        if loc is None:
            return self.read(key)
        offset, csize, method, crc, size, flags, name, end = loc
        encrypted = flags & 0x1
        where = f"{self.path}: archive entry '{key}'"
        if size > MAX_FILE_BYTES or csize > MAX_FILE_BYTES:
            raise DataError(f"{where}: declares {max(size, csize):,} bytes, more than any image "
                            f"file should ({MAX_FILE_BYTES:,}); refused before inflating (zip bomb?)")
        if encrypted:
            raise DataError(f"{where}: encrypted; re-zip the dataset without a password")
        if method not in _DECOMPRESSORS:
            raise DataError(f"{where}: compression method {method} is not supported (stored, "
                            f"deflate, bzip2 and LZMA are); re-zip it with plain deflate")
        try:
            raw = self._read_member(where, offset, csize, _raw_name(name, flags), end)
        except OSError as e:
            raise DataError(f"{where}: cannot read ({e.strerror})") from None
        if len(raw) != csize:
            raise DataError(f"{where}: truncated ({len(raw)} of {csize} bytes)")
        try:
            # never produce more than the declared size + 1 byte, whatever the method, so a
            # member that lies about its size cannot eat memory (bzip2 and LZMA expand a
            # few KB into gigabytes as readily as deflate does)
            raw = _DECOMPRESSORS[method](raw, size + 1)
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as e:
            raise DataError(f"{where}: corrupt compressed data ({e})") from None
        # the same checks zipfile makes: declared size and CRC-32
        if len(raw) != size or zlib.crc32(raw) != crc:
            raise DataError(f"{where}: CRC or size mismatch (corrupt archive)")
        return raw

    def _read_member(self, where: str, offset: int, csize: int, name: bytes, end: int) -> bytes:
        """A member's compressed bytes, after checking that its local header carries the
        central directory's name and that its data ends before the next member begins."""
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(offset)
        header = self._fh.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
            raise DataError(f"{where}: bad local header (truncated or corrupt archive)")
        name_len, extra_len = _LOCAL_HEADER.unpack(header)[9:]
        local_name = self._fh.read(name_len)
        if local_name != name:
            shown = local_name.decode("utf-8", "replace")
            raise DataError(f"{where}: its local header names it {shown!r}; "
                            f"an archive whose two names for a member differ is crafted or "
                            f"corrupt; re-create the zip")
        if offset + _LOCAL_HEADER.size + name_len + extra_len + csize > end:
            raise DataError(f"{where}: its data overlaps the next member's (a crafted "
                            f"archive, e.g. a zip bomb); re-create the zip")
        self._fh.seek(extra_len, os.SEEK_CUR)
        return self._fh.read(csize)

    def open(self) -> None:
        try:
            self._zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise DataError(f"{self.path}: not a readable zip archive ({e}); "
                            f"a truncated download looks like this") from None
        except UnicodeDecodeError as e:
            # a member flagged as UTF-8 whose name is not
            raise DataError(f"{self.path}: a member's name is flagged as UTF-8 but is not "
                            f"({e.object[:60]!r}); not a readable zip archive") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot open ({e.strerror})") from None
        self._infos = None

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None:
            self.open()
        assert self._zf is not None
        return self._zf

    def _info(self) -> dict[str, zipfile.ZipInfo]:
        if self._infos is None:
            infos = self._zip().infolist()
            by_name: dict[str, zipfile.ZipInfo] = {}
            for i in infos:
                check_member_name(i.filename, str(self.path))
                if i.filename in by_name:
                    # zipfile keeps the last one silently; which copy is "the" image is
                    # anyone's guess, and the counts would be wrong
                    raise DataError(f"{self.path}: archive holds the name {i.filename!r} more "
                                    f"than once; re-create the zip")
                by_name[i.filename] = i
            self._ends = _member_ends(infos, self._zip().start_dir, str(self.path))
            self._infos = by_name
        return self._infos

    def entries(self) -> list[Entry]:
        self.ignored = []
        rels = [(n.rstrip("/"), n, i.is_dir()) for n, i in self._info().items()]
        return self._collect(rels)

    def read(self, key: str) -> bytes:
        return self.read_located(key, self.locate([key])[0])

    def stat_key(self) -> dict:
        st = self.path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def digest(self) -> str:
        h = hashlib.sha256()
        for n, i in sorted(self._info().items()):
            h.update(f"{n}\0{i.file_size}\0{i.CRC}\n".encode())
        return h.hexdigest()

    def close(self) -> None:
        if self._zf is not None:
            self._zf.close()
        if self._fh is not None:
            self._fh.close()
        self._zf = None
        self._fh = None
        self._infos = None
        self._ends = {}


class DirSource(Source):
    kind = "dir"

    def __init__(self, path: Path):
        super().__init__(path)
        self._listing: list[tuple[str, str, bool, int, int]] | None = None

    def _list(self):
        if self._listing is None:
            out = []
            # Symlinked folders are followed (a class folder linked from elsewhere is a
            # common way to assemble a dataset). Nothing valid lies deeper than
            # wrapper/split/class, so sub-folders there are listed (an error in
            # _collect) but not entered: a symlink loop cannot make the walk endless.
            for root, dirs, files in os.walk(self.path, followlinks=True):
                rroot = Path(root).relative_to(self.path).as_posix()
                for d in dirs:
                    rel = d if rroot == "." else f"{rroot}/{d}"
                    out.append((rel, os.path.join(root, d), True, 0, 0))
                if rroot.count("/") >= 2:  # wrapper/split/class: list its sub-folders only
                    dirs[:] = []
                for f in files:
                    rel = f if rroot == "." else f"{rroot}/{f}"
                    full = os.path.join(root, f)
                    try:
                        st = os.stat(full)
                    except OSError as e:
                        raise DataError(f"{full}: cannot stat ({e.strerror})") from None
                    if not stat.S_ISREG(st.st_mode):
                        raise DataError(f"{full}: not a regular file")
                    out.append((rel, full, False, st.st_size, st.st_mtime_ns))
            out.sort()
            self._listing = out
        return self._listing

    def entries(self) -> list[Entry]:
        self.ignored = []
        return self._collect([(r, k, d) for r, k, d, _, _ in self._list()])

    def read(self, key: str) -> bytes:
        return read_file_bounded(key)

    def stat_key(self) -> dict:
        # a folder has no single mtime that covers its files: always use the digest
        return {"size": -1, "mtime_ns": -1}

    def digest(self) -> str:
        h = hashlib.sha256()
        for rel, _, is_dir, size, mtime in self._list():
            if not is_dir:
                # (a name that is not UTF-8 keeps its own bytes)
                h.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def resolve_path(data: str | os.PathLike | None) -> Path:
    """The dataset path from --data, else $CIFAKE_PATH, else a kagglehub download."""
    if data is None or str(data) == "":
        data = os.environ.get("CIFAKE_PATH") or None
    if data is None:
        return _kagglehub_download()
    p = Path(data).expanduser()
    if not p.exists():
        raise DataError(f"--data path does not exist: {p}")
    return p.resolve()


def _kagglehub_download() -> Path:
    try:
        import kagglehub  # optional; only used when no path is given
    except ImportError:
        raise DataError("no dataset given: pass --data PATH (the Kaggle cifake zip or its extracted "
                        "folder) or set CIFAKE_PATH; or `pip install kagglehub` with Kaggle "
                        f"credentials to download {KAGGLE_HANDLE}") from None
    try:
        return Path(kagglehub.dataset_download(KAGGLE_HANDLE)).resolve()
    except Exception as e:  # network, credentials
        raise DataError(f"kagglehub download of {KAGGLE_HANDLE} failed ({e}); pass --data PATH "
                        f"or set CIFAKE_PATH instead") from None


def open_source(path: Path) -> Source:
    if path.is_dir():
        return DirSource(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not a zip archive (truncated, or another format); expected "
                            f"the Kaggle cifake zip or its extracted folder")
        return ZipSource(path)
    raise DataError(f"{path}: neither a zip file nor a folder")
