"""Measure ONE (backend, device, model) in this process: ``python -m bench.speed.worker SPEC_JSON``.

Run by ``bench.compare`` in a fresh subprocess per backend, so the peak memory
(``ru_maxrss``) and the thread pools are this backend's alone. Progress goes to
stderr, one line per phase; the result is ONE line on stdout, prefixed ``RESULT_TAG``.
A row on several devices (``n_devices``) trains data-parallel; for torch that is one
process per device under torchrun, every one measuring, rank 0 alone reporting (the
clock is the same for all: every step waits for every rank).
``python -m bench.speed.worker --probe [torch] [jax]`` instead prints the environment (versions,
threads, the GPUs those libraries see) as that line.

Phases (all clocks read with ``time.perf_counter`` after the device is idle):
1. throughput   -- a timing set of ``steps * batch_size`` training images (CNNs) or the
                   whole training split (MLPs: one timed pass = one real epoch). The first
                   pass is not timed into throughput: for JIT backends it is reported as
                   ``compile_s`` (compilation + one pass), for eager ones as ``warmup_s``.
                   Then ``repeats`` timed passes -> images/s median / min / max.
2. eval         -- eval-mode logits of ``eval_images`` test images: one untimed warm-up
                   call, then ``repeats`` timed calls.
3. epoch        -- time of one epoch over the whole training split: MLPs measured (phase 1);
                   CNNs measured on a GPU or with ``measure_cnn_epoch`` (after a warm-up epoch
                   for JIT backends), otherwise (CPU) estimated as n_train / median images/s.
4. budget       -- accuracy after ``budget_epochs`` epochs on the first ``budget_subset``
                   training images per class, starting from the spec's initial weights for the
                   seed (``init_weights``, shared by every backend of the family), evaluated
                   on the whole test split (skipped on synthetic data).
5. full batch   -- MLPs: seconds per full-batch gradient-descent epoch over the whole
                   training split (one untimed warm-up epoch, then ``repeats`` timed ones),
                   with the ``<model>-full`` preset's learning rate.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback

import numpy as np

RESULT_TAG = "BENCH_RESULT "


def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 logs and reports."""
    return int(os.environ.get("RANK", "0"))


def log(spec: dict, msg: str) -> None:
    if rank() == 0:
        n = spec.get("n_devices", 1)
        print(f"[bench] {spec['backend']}/{spec['device']}{f' x{n}' if n > 1 else ''}/"
              f"{spec['model']}: {msg}", file=sys.stderr, flush=True)


def rss_peak_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def spread(values: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1],
            "values": v, "n": len(v)}


# ------------------------------------------------------------------ data
class _Split:
    """The bits of data.cache.Split the backends use (images, labels, len, take)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def take(self, idx):
        return _Split(self.images[idx], self.labels[idx])

    def subset_per_class(self, n):
        idx = np.concatenate([np.flatnonzero(self.labels == c)[:n] for c in (0, 1)])
        return self.take(np.sort(idx))


def synthetic_splits(n_train: int, n_test: int, seed: int):
    """Random uint8 images of CIFAKE's shape and random labels: throughput only."""
    g = np.random.default_rng(seed)
    mk = lambda n: _Split(g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),  # noqa: E731
                          g.integers(0, 2, n).astype(np.uint8))
    return mk(n_train), mk(n_test)


def load_splits(spec: dict):
    if spec["data"] is None:
        return synthetic_splits(spec["synthetic_train"], spec["synthetic_test"], spec["seed"])
    from data import load_cifake
    ds = load_cifake(spec["data"], spec.get("cache_dir"), verbose=False)
    return ds.train, ds.test


# ------------------------------------------------------------------ phases
def run(spec: dict) -> dict:
    """Every phase for one row: training and evaluation throughput, the epoch figure, the
    accuracy budget, memory, and the MLPs' full-batch epochs."""
    from bench.speed.backends import make_backend
    from core.catalog import family_of
    t_start = time.perf_counter()
    model, seed = spec["model"], spec["seed"]
    family = family_of(model)
    log(spec, "importing and loading data")
    train, test = load_splits(spec)
    n_devices = spec.get("n_devices", 1)
    b = make_backend(spec["backend"], model, spec["device"], seed, n_devices,
                     conv_impl=spec.get("jax_conv"))
    setup_s = time.perf_counter() - t_start
    rss_setup = rss_peak_mib()
    res = {"backend": spec["backend"], "device": spec["device"], "model": model,
           "n_devices": n_devices,
           "family": family, "device_name": b.device_name(), "hyperparameters": b.hp,
           "notes": b.notes(), "setup_s": setup_s, "n_train": len(train), "n_test": len(test),
           "threads": thread_info()}
    res["train"] = train_phase(spec, b, family, train)
    res["eval"] = eval_phase(spec, b, test)
    res["epoch"] = epoch_phase(spec, b, family, train, res["train"])
    res["budget"] = None if spec["data"] is None else budget_phase(spec, b, family, train, test)
    res["memory"] = {"peak_rss_mib": rss_peak_mib(), "rss_after_setup_mib": rss_setup,
                     "how": "ru_maxrss of this worker process (imports + data + training)"
                            + ("; torch: rank 0's process" if n_devices > 1 else "")}
    dev = b.peak_device_bytes()
    res["memory"]["peak_device_mib"] = None if dev is None else dev / 2**20
    # MLPs: full-batch gradient descent epochs over the whole training split (after the
    # memory figure above: the full-batch float copy is this phase's own)
    res["full_batch"] = full_batch_phase(spec, b, train) if family == "mlp" else None
    res["wall_s"] = time.perf_counter() - t_start
    return res


def train_phase(spec: dict, b, family: str, train) -> dict:
    """Training images/s: one untimed pass (warm-up, or compilation for the JIT
    backends), then ``repeats`` timed passes of the backend's own epoch function."""
    bs, repeats = b.hp["batch_size"], spec["repeats"]
    if family == "mlp":
        tset, how = train, "whole training split per timed pass (one real epoch)"
    else:
        k = min(len(train), spec["steps"] * bs)
        tset = train.take(np.arange(k))
        how = f"{k} training images ({-(-k // bs)} steps of {bs}) per timed pass"
    h = b.put(tset)
    b.init(spec["seed"])
    runner = getattr(b, "runner", None)  # the JAX backends' (lax.scan chunks)
    if runner is not None:
        if family == "cnn":  # one compiled lax.scan call covers the whole timing set
            runner.chunk_batches = max(1, len(tset) // bs)
        how += f"; {runner.chunk_batches} batches per compiled lax.scan call"
    log(spec, f"training warm-up{' + compilation' if b.jit else ''} ({len(tset)} images)")
    t0 = time.perf_counter()
    b.train_epoch(h, 0)
    first_s = time.perf_counter() - t0
    secs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        m = b.train_epoch(h, 1 + r)
        secs.append(time.perf_counter() - t0)
        log(spec, f"train pass {r + 1}/{repeats}: {len(tset) / secs[-1]:,.0f} images/s")
    if not np.isfinite(m["loss"]):
        raise RuntimeError(f"non-finite training loss {m['loss']} during the timing passes")
    return {"images_per_s": spread([len(tset) / s for s in secs]),
            "seconds_per_pass": spread(secs), "images_per_pass": len(tset), "how": how,
            "compile_s": first_s if b.jit else None, "warmup_s": None if b.jit else first_s,
            "first_call": "compilation + one pass (not in images/s)" if b.jit
            else "one untimed warm-up pass"}


def eval_phase(spec: dict, b, test) -> dict:
    """Evaluation images/s: eval-mode logits after one untimed call."""
    k = min(len(test), spec["eval_images"])
    h = b.put(test.take(np.arange(k)))
    log(spec, f"eval warm-up ({k} images)")
    t0 = time.perf_counter()
    b.logits(h)
    eval_first = time.perf_counter() - t0
    secs = []
    for r in range(spec["repeats"]):
        t0 = time.perf_counter()
        b.logits(h)
        secs.append(time.perf_counter() - t0)
    out = {"images_per_s": spread([k / s for s in secs]), "images_per_pass": k,
           "compile_s": eval_first if b.jit else None,
           "warmup_s": None if b.jit else eval_first,
           "how": f"eval-mode logits of {k} test images per timed pass"}
    log(spec, f"eval: {out['images_per_s']['median']:,.0f} images/s")
    return out


def epoch_phase(spec: dict, b, family: str, train, train_res: dict) -> dict:
    """Seconds for one epoch over the whole training split: measured (MLPs, a GPU, or
    --measure-cnn-epoch), else estimated from the training images/s, and labelled so."""
    if family == "mlp":
        return {"seconds": train_res["seconds_per_pass"]["median"], "n_images": len(train),
                "how": "measured", "detail": "median of the timed full-epoch passes"}
    if not (spec["measure_cnn_epoch"] or spec["device"] == "gpu"):  # a GPU epoch is cheap
        return {"seconds": len(train) / train_res["images_per_s"]["median"],
                "n_images": len(train), "how": "estimated",
                "detail": "n_train / median training images/s of phase 1"}
    h = b.put(train)
    if b.jit:  # the full split adds scan shapes: compile them outside the clock
        log(spec, "full-epoch warm-up (compilation of the full split's shapes)")
        b.train_epoch(h, 0)
    log(spec, f"timing one full epoch ({len(train)} images)")
    t0 = time.perf_counter()
    b.train_epoch(h, 1)
    return {"seconds": time.perf_counter() - t0, "n_images": len(train), "how": "measured",
            "detail": "one full epoch, after warm-up"}


def budget_phase(spec: dict, b, family: str, train, test) -> dict:
    """Accuracy under the fixed budget: per seed, the spec's initial weights (shared files),
    budget_epochs epochs on the first budget_subset images per class, the whole test split."""
    from core.metrics import classification_report
    from core.tensors import load_safetensors
    bset = train.subset_per_class(spec["budget_subset"])
    seeds = spec.get("budget_seed_list") or [spec["seed"]]
    inits = spec.get("init_weights") or [None] * len(seeds)
    log(spec, f"budget: {spec['budget_epochs']} epoch(s) on {len(bset)} images, "
              f"then the whole test split ({len(test)}), seed(s) {seeds}")
    runner = getattr(b, "runner", None)
    if runner is not None and family == "cnn":
        runner.chunk_batches = 50  # jax_port's default chunking, as its CLI trains
    runs = []
    for sd, init in zip(seeds, inits):
        b.set_seed(sd)
        b.init(sd, load_safetensors(init)[0] if init else None)
        h = b.put(bset)
        t0 = time.perf_counter()
        hist = [b.train_epoch(h, e) for e in range(spec["budget_epochs"])]
        train_s = time.perf_counter() - t0
        del h
        rep = classification_report(b.logits(b.put(test)), test.labels)
        runs.append({"seed": sd, "train_seconds": train_s,
                     "final_train_loss": hist[-1]["loss"], "test_accuracy": rep["accuracy"],
                     "test_loss": rep["loss"], "test_auc": rep["roc_auc"],
                     "test_confusion": rep["confusion"], "n_test": rep["n"]})
        log(spec, f"budget: seed {sd}: test accuracy {rep['accuracy']:.2f}%")
    accs = [r["test_accuracy"] for r in runs]
    return {**runs[0], "epochs": spec["budget_epochs"], "subset_per_class": spec["budget_subset"],
            "init": ("the spec's init for each seed (shared files)" if inits[0]
                     else "this backend's own init for each seed"),
            "n_train": len(bset),
            "train_seconds_note": "wall time incl. any compilation (first seed)",
            # the first seed's fields above; over every seed:
            "seeds": seeds, "per_seed": runs, "test_accuracy": statistics.fmean(accs),
            "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None}


def full_batch_phase(spec: dict, b, train) -> dict:
    """One untimed full-batch epoch (compilation; JAX's float copy of the split), then
    ``repeats`` timed ones, from the spec's initial weights with the ``<model>-full``
    preset's learning rate: the figure that dominates the 7000-epoch full-batch rows."""
    from bench.speed.backends import full_batch_hyperparameters
    b.init(spec["seed"])
    rss_before = rss_peak_mib()
    log(spec, f"full-batch warm-up ({len(train)} images)")
    t0 = time.perf_counter()
    h = b.put_full_batch(train)
    b.full_batch_epoch(h, 0)
    first_s = time.perf_counter() - t0
    secs = []
    for r in range(spec["repeats"]):
        t0 = time.perf_counter()
        m = b.full_batch_epoch(h, 1 + r)
        secs.append(time.perf_counter() - t0)
    del h
    if not np.isfinite(m["loss"]):
        raise RuntimeError(f"non-finite loss {m['loss']} in the full-batch epochs")
    log(spec, f"full-batch epoch: {statistics.median(secs):.3f} s")
    return {"seconds": spread(secs), "n_images": len(train),
            "hyperparameters": full_batch_hyperparameters(spec["model"]),
            "epochs": 1 + spec["repeats"], "final_train_loss": m["loss"],
            "first_s": first_s, "first_call": "data preparation + compilation (JIT) + one "
                                              "epoch, not in the timed epochs",
            "peak_rss_mib": rss_peak_mib(), "peak_rss_before_mib": rss_before,
            "how": f"median of {spec['repeats']} timed full-batch epochs (one gradient-descent "
                   f"step over the whole training split each)"}


# ------------------------------------------------------------------ environment
def thread_info() -> dict:
    out = {"os_cpu_count": os.cpu_count(),
           "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                              "OPENBLAS_NUM_THREADS", "XLA_FLAGS")
                   if k in os.environ}}
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
        out["torch_interop_threads"] = sys.modules["torch"].get_num_interop_threads()
    return out


def probe(libs: list[str]) -> dict:
    """Versions of every library (from package metadata, without importing them); devices
    and threads of the libraries in ``libs`` ("torch", "jax"), imported in this throwaway
    process."""
    from importlib import metadata
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "jax", "jaxlib", "flax", "optax"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if "torch" in libs:
        info.update(_probe_torch())
    if "jax" in libs:
        info.update(_probe_jax())
    info["threads"] = thread_info()
    return info


def _probe_torch() -> dict:
    info = {}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
        info["torch_gpu"] = torch.cuda.get_device_name(0) if info["torch_cuda"] else None
        info["torch_gpu_count"] = torch.cuda.device_count() if info["torch_cuda"] else 0
        info["torch_threads"] = torch.get_num_threads()
    except Exception as e:  # noqa: BLE001 -- report, don't fail: the row will say why
        info["torch_error"] = f"{type(e).__name__}: {e}"
    return info


def _probe_jax() -> dict:
    info = {}
    try:
        import jax
        info["jax"] = jax.__version__
        import flax
        import optax
        info["flax"], info["optax"] = flax.__version__, optax.__version__
        info["jax_backend"] = jax.default_backend()
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        info["jax_gpu"] = gpus[0].device_kind if gpus else None
        info["jax_gpu_count"] = len(gpus)
        info["jax_cpu_count"] = len(jax.devices("cpu"))  # >1 with forced host devices
    except Exception as e:  # noqa: BLE001
        info["jax_error"] = f"{type(e).__name__}: {e}"
    return info


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--probe":  # --probe [torch] [jax]
        print(RESULT_TAG + json.dumps(probe(argv[1:])), flush=True)
        return 0
    if argv and argv[0] == "--machine":  # the compute roof and memory bandwidth, now
        from bench.speed.machine import measure
        print(RESULT_TAG + json.dumps(measure()), flush=True)
        return 0
    spec = json.loads(argv[0])
    try:
        out = {"ok": True, **run(spec)}
    except Exception as e:  # noqa: BLE001 -- one failed backend must not sink the bench
        traceback.print_exc(file=sys.stderr)
        out = {"ok": False, "backend": spec["backend"], "device": spec["device"],
               "model": spec["model"], "n_devices": spec.get("n_devices", 1),
               "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    if rank() == 0:
        print(RESULT_TAG + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
