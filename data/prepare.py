"""python -m data.prepare [--data PATH] [--cache-dir DIR]: build or verify the cache, report it.

Prints, per split and class, the image counts; the number of byte-identical
duplicates inside each split; the number of test images whose bytes also occur
in train (the leak) and the size of the de-duplicated test view.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .cache import duplicate_count, load_cifake
from .errors import DataError, project_version, run_cli
from .source import CLASSES


def report(ds) -> dict:
    out = {"counts": {}, "duplicates": {}, "files_ignored": ds.manifest.get("ignored_files", 0)}
    for name in ("train", "test"):
        s = getattr(ds, name)
        out["counts"][name] = {c: int((s.labels == i).sum()) for i, c in enumerate(CLASSES)}
        out["duplicates"][name] = {c: duplicate_count(s.digests[s.labels == i])
                                   for i, c in enumerate(CLASSES)}
    in_train = np.isin(ds.test.digests, ds.train.digests)
    out["test_in_train"] = {"images": int(in_train.sum()),
                            "distinct": int(len(np.unique(ds.test.digests[in_train])))}
    out["test_deduplicated_size"] = int((~in_train).sum())
    return out


class _Parser(argparse.ArgumentParser):
    """The data layer's own parser (it imports no other package of the project): the same
    conventions as every command's (no prefix matching, one-line errors, --version)."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                         **kw)
        self.add_argument("--version", action="version", version=f"%(prog)s {project_version()}")

    def error(self, message: str):
        raise DataError(message)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m data.prepare", description=__doc__.split("\n")[0],
                 epilog="example:\n  python -m data.prepare --data cifake.zip")
    ap.add_argument("--data", help="Kaggle cifake zip or extracted folder (default: $CIFAKE_PATH, "
                                   "then kagglehub)")
    ap.add_argument("--cache-dir", help="cache base folder (default: ~/.cache/cifake-detector)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    t0 = time.time()
    ds = load_cifake(args.data, args.cache_dir, allow_test_inside_train=True)
    secs = time.time() - t0
    r = report(ds)
    r["seconds"] = round(secs, 2)
    r["cache_build_seconds"] = ds.manifest.get("build_seconds")
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"source: {ds.manifest['source']['path']}")
    print(f"{'split':<6} {'class':<5} {'images':>8} {'duplicates':>11}")
    for split in ("train", "test"):
        for c in CLASSES:
            print(f"{split:<6} {c:<5} {r['counts'][split][c]:>8,} {r['duplicates'][split][c]:>11,}")
    t = r["test_in_train"]
    print(f"test images also in train: {t['images']:,} ({t['distinct']:,} distinct)")
    print(f"de-duplicated test view: {r['test_deduplicated_size']:,} images")
    if r["files_ignored"]:
        print(f"files outside train|test/REAL|FAKE ignored: {r['files_ignored']}")
    print(f"ready in {secs:.2f} s (cache built in {ds.manifest.get('build_seconds')} s)")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="data.prepare")
