"""``python -m bench.compare``: what does each backend cost and what does it reach, on this machine?

For every selected (backend, device, model) a fresh worker process (``bench.speed.worker``)
measures training and evaluation throughput (median and min/max over ``--repeats``
timed passes; compilation and warm-up excluded and reported apart), the time of one
epoch over the whole training split (measured for MLPs; for CNNs estimated from the
throughput unless ``--measure-cnn-epoch``), peak memory, and the test accuracy reached
under ONE fixed budget shared by all (``--budget-epochs`` epochs on the first
``--budget-subset`` training images per class, same seeds and batch order, evaluated on
the whole test split; mean ± std over ``--budget-seeds`` seeds). ``bench.speed.parity`` checks that the JAX port computes the specs'
function. Ratios are taken against a reference measured in the same run (NumPy for the
MLPs, the torchvision pipeline for the CNNs), and a few headline figures (the JAX port
against the fastest torch row, ...). It also measures the machine itself before and after
the rows (``bench.speed.machine``: NumPy's sgemm rate, the compute roof, and the memory
bandwidth), and gives each CPU row's training FLOPs/s as a fraction of that roof, so a
figure can be read against the machine it came from. The project's own speed targets and how the committed
runs measured against them are in docs/bench.md, not in this tool's output.

Outputs (``--out``, default ``results/bench/<UTC timestamp>/``, every file written via
temp + rename): ``bench.json`` (every figure, how each was obtained, versions, devices,
threads, git commit, configuration, command), ``table.txt`` (the console table) and
``bench.png`` (throughput and accuracy per backend).

Data: ``--data PATH``, else ``$CIFAKE_PATH``. Without either (or with ``--data none`` /
``--synthetic``) throughput is measured on random uint8 images of CIFAKE's shape and the
accuracy columns are absent (the table says how to get CIFAKE). No path on the developers'
machines is a default here; ``make bench`` passes theirs.

Devices: ``--devices auto`` (default) = the CPU, plus the GPU when torch or JAX sees one
(a backend whose library sees no GPU is skipped with a note). Asking explicitly for
``gpu`` when neither library sees one is an error (exit 2): the user asked for a
measurement that cannot be made. Unknown backends/models/devices: one line, exit 2.

Several devices of a kind: where a library sees more than one (several GPUs; JAX with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on the CPU), each backend that can
(jax-mlp, jax-cnn over a Mesh; torch-device with DDP under torchrun, GPUs only) also runs
on all N of them, the same batches, and its row reports the scaling efficiency: training
images/s on N devices / (N x images/s on one), 1.0 = perfect scaling (``--no-scaling``
skips these rows). Every row says its device count.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from data.errors import UserError, run_cli
from core.atomic import atomic_write_bytes, atomic_write_json
from core.tensors import save_safetensors
from core.catalog import CNN_MODELS, MLP_MODELS, MODELS, family_of
from core import flags
from core.flags import ArgumentParser, positive_int

from jax_port import CONV_IMPLS  # the names only: importing it starts no JAX

from .files import out_dir, png_bytes

from .speed.backends import BACKENDS, DEVICES, REFERENCE, TORCH_CNN_BACKENDS, spec_init_weights
from .speed.machine import roofline_fraction, train_flops
from .speed.worker import RESULT_TAG

PROG = "python -m bench.compare"
REPO = Path(__file__).resolve().parents[1]
KAGGLE_URL = "https://www.kaggle.com/datasets/birdy654/cifake-real-and-ai-generated-synthetic-images"
SCHEMA = "cifake-bench/1"

# Default measurement sizes. Units: repeats = timed passes per throughput figure;
# steps = training steps (batches) per timed CNN pass; eval_images = test images per timed
# eval pass; budget_epochs = epochs; budget_subset = training images PER CLASS.
# budget_seeds = seeds of the accuracy budget (seed, seed + 1, ...): at 3 epochs on 4,000
# images one seed's accuracy swings by 2-3 pp, so the column is a mean ± std over several.
DEFAULTS = dict(repeats=3, steps=50, eval_images=5000, budget_epochs=3, budget_subset=2000,
                budget_seeds=3, synthetic_train=100_000, synthetic_test=20_000)
# --quick: a smoke test of about a minute on the mini archive (2000/class train).
QUICK = dict(repeats=2, steps=10, eval_images=1000, budget_epochs=1, budget_subset=200,
             budget_seeds=1, synthetic_train=4000, synthetic_test=1000)
DEFAULT_MODELS = ("mlp4", "v3")
FULL_TRAIN = 100_000             # CIFAKE's training images
TORCH_DEVICE_PIPELINE = ("torch-device", "torch-device-cl", "torch-device-fused", "torch-compile")


# ------------------------------------------------------------------ flags
def _names(kind: str, allowed: tuple[str, ...]):
    def parse(s: str) -> list[str]:
        items = [t.strip() for t in s.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, bad)) or repr(s)} "
                f"(choose from {', '.join(allowed)})")
        return list(dict.fromkeys(items))
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                        epilog=f"example:\n  {PROG} --data cifake.zip --quick")
    ap.add_argument("--backends", type=_names("backend", tuple(BACKENDS)), default=list(BACKENDS),
                    help=f"comma-separated (default all: {','.join(BACKENDS)})")
    ap.add_argument("--models", type=_names("model", MODELS), default=list(DEFAULT_MODELS),
                    help=f"comma-separated from {','.join(MODELS)} (default mlp4,v3); each "
                         f"backend runs the models of its family")
    ap.add_argument("--devices", type=_names("device", ("auto",) + DEVICES), default=["auto"],
                    help="cpu, gpu or auto (default: cpu, plus gpu when present)")
    ap.add_argument("--data", help="CIFAKE zip or folder; 'none' = synthetic images "
                                   "(default: $CIFAKE_PATH, else synthetic images)")
    ap.add_argument("--synthetic", action="store_true", help="same as --data none")
    ap.add_argument("--cache-dir", help="decoded-image cache folder (default ~/.cache/cifake-detector)")
    ap.add_argument("--out", help="output folder (default results/bench/<UTC timestamp>)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test (~1 min): mini archive, fewer repeats/steps, tiny budget")
    ap.add_argument("--repeats", type=positive_int("--repeats"),
                    help=f"timed passes per throughput figure (default {DEFAULTS['repeats']}, "
                         f"quick {QUICK['repeats']})")
    ap.add_argument("--steps", type=positive_int("--steps"),
                    help=f"training steps per timed CNN pass (default {DEFAULTS['steps']})")
    ap.add_argument("--eval-images", type=positive_int("--eval-images"),
                    help=f"test images per timed eval pass (default {DEFAULTS['eval_images']})")
    ap.add_argument("--budget-epochs", type=positive_int("--budget-epochs"),
                    help=f"epochs of the accuracy budget (default {DEFAULTS['budget_epochs']})")
    ap.add_argument("--budget-subset", type=positive_int("--budget-subset"),
                    help=f"training images PER CLASS of the accuracy budget "
                         f"(default {DEFAULTS['budget_subset']})")
    ap.add_argument("--budget-seeds", type=positive_int("--budget-seeds"),
                    help=f"seeds of the accuracy budget, from --seed on: the column shows their "
                         f"mean ± sample std (default {DEFAULTS['budget_seeds']}, quick "
                         f"{QUICK['budget_seeds']})")
    ap.add_argument("--measure-cnn-epoch", action="store_true",
                    help="time a real full CNN epoch on the CPU too (slow there) instead of "
                         "estimating it from the throughput (GPU CNN epochs are always measured)")
    ap.add_argument("--seed", type=flags.seed, default=0,
                    help="seed of init, batch order, augmentation, in [0, 2**32)")
    ap.add_argument("--jax-conv", choices=CONV_IMPLS, default=None,
                    help="the JAX CNN's convolution formulation (default: the port's own "
                         "for the device, what `python -m jax_port.train` uses); parity is "
                         "checked for the one timed")
    ap.add_argument("--no-parity", action="store_true", help="skip the parity checks")
    ap.add_argument("--no-chart", action="store_true", help="skip bench.png")
    ap.add_argument("--no-scaling", action="store_true",
                    help="no rows on several devices even where a library sees several")
    ap.add_argument("--worker-timeout", type=positive_int("--worker-timeout"), default=900,
                    help="seconds before a backend's worker is killed (default 900)")
    return ap


def user_path(p: str) -> str:
    """``p`` as an absolute path, relative to the user's working directory: the workers
    run with the repository as theirs, where a relative path means something else."""
    return os.path.abspath(os.path.expanduser(p))


def resolve_data(args) -> tuple[str | None, str]:
    """-> (absolute path or None for synthetic, how it was chosen)."""
    if args.synthetic or (args.data is not None and args.data.lower() == "none"):
        return None, "synthetic (asked for with --synthetic / --data none)"
    if args.data:
        if not Path(user_path(args.data)).exists():
            raise UserError(f"--data {args.data}: no such file or folder")
        return user_path(args.data), "--data"
    env = os.environ.get("CIFAKE_PATH")
    if env:
        if not Path(user_path(env)).exists():
            raise UserError(f"CIFAKE_PATH={env}: no such file or folder")
        return user_path(env), "$CIFAKE_PATH"
    return None, "synthetic: no CIFAKE found (no --data, no $CIFAKE_PATH)"


# ------------------------------------------------------------------ subprocesses
def _pump(stream, sink: list[str], echo: bool) -> None:
    for line in stream:
        sink.append(line)
        if echo:  # the worker's progress lines, live
            sys.stderr.write(line)
            sys.stderr.flush()


def worker_argv(backend: str, spec: dict) -> list[str]:
    """``python -m`` arguments of one row's worker: torch on several devices is one
    process per device, started by torchrun (on this one host)."""
    n = spec.get("n_devices", 1)
    if n > 1 and BACKENDS[backend].stack == "torch_cnn":
        return ["torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                "-m", "bench.speed.worker", json.dumps(spec)]
    return ["bench.speed.worker", json.dumps(spec)]


def run_worker(argv: list[str], env: dict, timeout: float) -> tuple[dict | None, str]:
    """Run ``python -m <argv>``; stream its stderr; -> (result dict or None, error text)."""
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    out: list[str] = []
    err: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, False), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err, True), daemon=True)]
    for t in pumps:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None, f"timed out after {timeout:.0f} s"
    finally:
        for t in pumps:
            t.join(10)
    for line in reversed(out):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), ""
    last = next((l.strip() for l in reversed(err) if l.strip()), "no output")
    return None, f"worker exited with status {proc.returncode}: {last}"


def worker_env(backend: str, device: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if BACKENDS[backend].stack == "jax_port":
        # one platform per worker: a CPU row must not initialise (or wait for) a GPU
        env["JAX_PLATFORMS"] = "cpu" if device == "cpu" else "cuda"
        # allocate on demand, so peak_bytes_in_use is what the backend needs
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


# ------------------------------------------------------------------ environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# ------------------------------------------------------------------ plan
def visible_devices(probe: dict, lib: str | None, device: str) -> int:
    """How many devices of ``device``'s kind ``lib`` sees (torch: one CPU)."""
    if lib == "jax":
        return int(probe.get(f"jax_{device}_count") or 1)
    if lib == "torch" and device == "gpu":
        return int(probe.get("torch_gpu_count") or 1)
    return 1


def plan_runs(args, probe: dict) -> tuple[list[tuple[str, str, str, int]], list[str]]:
    """-> ([(backend, device, model, device count)], notes about what was skipped). Every
    row runs on one device; a backend that can also runs on all the devices of the kind
    its library sees, when that is more than one."""
    gpu_seen = {"torch": bool(probe.get("torch_cuda")), "jax": bool(probe.get("jax_gpu"))}
    explicit_gpu = "gpu" in args.devices
    if "auto" in args.devices:
        devices = ["cpu"] + (["gpu"] if any(gpu_seen.values()) else [])
    else:
        devices = list(args.devices)
    libs = sorted({BACKENDS[b].gpu for b in args.backends if BACKENDS[b].gpu})
    if explicit_gpu and not any(gpu_seen[lib] for lib in libs):
        who = ("the chosen backends run on the CPU only" if not libs else
               f"{libs[0]} sees no GPU on this machine" if len(libs) == 1 else
               "neither torch nor JAX sees a GPU on this machine")
        raise UserError(f"--devices gpu: {who} (use --devices cpu or auto)")
    notes = []
    if "auto" in args.devices and "gpu" not in devices:
        notes.append("gpu: no GPU visible to torch or JAX -- GPU rows skipped")
    runs = []
    for model in args.models:
        fam = family_of(model)
        backends = [b for b in args.backends if BACKENDS[b].family == fam]
        if not backends:
            raise UserError(f"--models {model}: none of the chosen backends "
                            f"({', '.join(args.backends)}) runs {fam.upper()} models")
        for b in backends:
            for d in devices:
                lib = BACKENDS[b].gpu
                if d == "gpu" and (lib is None or not gpu_seen[lib]):
                    notes.append(f"{b}/gpu/{model}: skipped ("
                                 + ("CPU-only backend" if lib is None else f"{lib} sees no GPU")
                                 + ")")
                    continue
                runs.append((b, d, model, 1))
                n = visible_devices(probe, lib, d)
                if n > 1 and BACKENDS[b].parallel and not getattr(args, "no_scaling", False):
                    runs.append((b, d, model, n))
    return runs, notes


# ------------------------------------------------------------------ analysis
def _med(r: dict, key: str) -> float | None:
    try:
        return r[key]["images_per_s"]["median"]
    except (KeyError, TypeError):
        return None


def add_ratios(rows: list[dict]) -> None:
    """ratio_* = this row's median / the family reference's median, same model (and same
    device where the reference runs there; numpy-mlp is CPU-only)."""
    ok = _one_device(rows)
    for r in rows:
        if not r.get("ok"):
            continue
        ref_name = REFERENCE[r["family"]]
        ref = ok.get((ref_name, r["device"], r["model"])) or ok.get((ref_name, "cpu", r["model"]))
        r["reference"] = None if ref is None else f"{ref_name}/{ref['device']}"
        for key in ("train", "eval"):
            a, b = _med(r, key), _med(ref, key) if ref else None
            r[key]["ratio_vs_reference"] = None if (a is None or not b) else a / b
        r["epoch"]["speedup_vs_reference"] = (ref["epoch"]["seconds"] / r["epoch"]["seconds"]
                                              if ref else None)


def _one_device(rows: list[dict]) -> dict:
    """(backend, device, model) -> its successful 1-device row (ratios and headlines are
    between those)."""
    return {(r["backend"], r["device"], r["model"]): r for r in rows
            if r.get("ok") and r.get("n_devices", 1) == 1}


def add_scaling(rows: list[dict]) -> None:
    """scaling_efficiency of every row on N > 1 devices: its median images/s / (N x the
    1-device row's), training and evaluation; 1.0 is perfect scaling."""
    one = _one_device(rows)
    for r in rows:
        if not r.get("ok"):
            continue
        n = r.get("n_devices", 1)
        base = one.get((r["backend"], r["device"], r["model"]))
        for key in ("train", "eval"):
            a, b = _med(r, key), _med(base, key) if base else None
            r[key]["scaling_efficiency"] = (None if n == 1 or a is None or not b
                                            else a / (n * b))


def measure_machine(notes: list[str]) -> dict | None:
    """This machine's compute roof and memory bandwidth (bench.speed.machine), in a worker
    of its own so that no library's threads are running beside it."""
    res, err = run_worker(["bench.speed.worker", "--machine"], worker_env("numpy-mlp", "cpu"), 300)
    if res is None:
        notes.append(f"could not measure the machine: {err}")
    return res


def machine_summary(before: dict | None, after: dict | None) -> dict | None:
    """The measurements before and after the rows; the roof is the higher sgemm rate of
    the two (the machine's speed drifts; a fraction against the higher roof is the
    conservative one)."""
    both = [m for m in (before, after) if m]
    if not both:
        return None
    return {"before": before, "after": after, "how": both[0]["how"],
            **{k: max(m[k] for m in both) for k in ("sgemm_gflops", "copy_gbps",
                                                     "copy_cache_gbps")}}


def add_roofline(rows: list[dict], machine: dict | None) -> None:
    """train.roofline: a CPU row's training FLOPs per second / the measured sgemm rate."""
    sgemm = machine["sgemm_gflops"] if machine else None
    for r in rows:
        if r.get("ok"):
            cpu = r["device"] == "cpu"
            r["train"]["flops_per_image"] = train_flops(r["model"])
            r["train"]["roofline"] = (roofline_fraction(r["model"], _med(r, "train"), sgemm)
                                      if cpu else None)


def _headline(what: str, value, unit: str, how: str, extra: dict | None = None) -> dict:
    return {"what": what, "value": value, "unit": unit, "how": how, **(extra or {})}


def headlines(rows: list[dict], models: list[str]) -> list[dict]:
    """The figures a reader looks for first, as measured in this run (value None where
    the run lacks a row): the JAX CNN's training speed against the fastest torch row,
    the JAX MLP's epoch against NumPy's, and a GPU's 50 v3 epochs. Targets and verdicts
    are the project's, kept in docs/bench.md, not in the tool's output."""
    ok = _one_device(rows)
    cnn = "v3" if "v3" in models else next((m for m in models if m in CNN_MODELS), None)
    mlp = "mlp4" if "mlp4" in models else next((m for m in models if m in MLP_MODELS), None)
    out = []
    jax_cpu = ok.get(("jax-cnn", "cpu", cnn))
    torch_cpu = [ok[(b, "cpu", cnn)] for b in TORCH_CNN_BACKENDS if (b, "cpu", cnn) in ok]
    best_torch = max(torch_cpu, key=lambda r: _med(r, "train"), default=None)
    ratio = (_med(jax_cpu, "train") / _med(best_torch, "train")
             if jax_cpu and best_torch else None)
    vs = f" ({best_torch['backend']} of {len(torch_cpu)})" if best_torch else ""
    out.append(_headline(f"cpu: jax-cnn {cnn} training / the fastest torch row{vs}",
                         None if ratio is None else round(ratio, 3), "x",
                         "ratio of median training images/s, same run"))
    out.append(_headline(f"cpu: jax-cnn {cnn} training",
                         round(_med(jax_cpu, "train"), 1) if jax_cpu else None, "images/s",
                         "median training images/s"))
    roof = jax_cpu["train"].get("roofline") if jax_cpu else None
    out.append(_headline(f"cpu: jax-cnn {cnn} training, fraction of the compute roof",
                         None if roof is None else round(100 * roof, 1), "%",
                         "training FLOPs/s / this run's sgemm rate"))
    jm, nm = ok.get(("jax-mlp", "cpu", mlp)), ok.get(("numpy-mlp", "cpu", mlp))
    sp = nm["epoch"]["seconds"] / jm["epoch"]["seconds"] if jm and nm else None
    out.append(_headline(f"cpu: numpy-mlp {mlp} epoch s / jax-mlp epoch s",
                         None if sp is None else round(sp, 3), "x",
                         f"both {jm['epoch']['how']}, {jm['epoch']['n_images']} images"
                         if jm and nm else "needs jax-mlp and numpy-mlp on cpu"))
    jg = ok.get(("jax-cnn", "gpu", "v3"))
    if any(r.get("device") == "gpu" for r in rows) or jg:
        s, how = _fifty_epochs(jg) if jg else (None, "jax-cnn v3 not run on the GPU")
        tv = ok.get(("torch-torchvision", "gpu", "v3"))
        tv_s = _fifty_epochs(tv)[0] if tv else None
        out.append(_headline(f"gpu: v3, 50 epochs x {FULL_TRAIN:,} images with JAX",
                             None if s is None else round(s, 2), "s", how,
                             {"torch_torchvision_s": None if tv_s is None else round(tv_s, 2)}))
    return out


def _fifty_epochs(r: dict) -> tuple[float, str]:
    """Seconds for 50 epochs over 100k images, from the row's epoch figure."""
    e = r["epoch"]
    per_image = e["seconds"] / e["n_images"]
    s = 50 * FULL_TRAIN * per_image
    how = (f"estimated: 50 x {FULL_TRAIN:,} x (epoch seconds / images; epoch "
           f"{e['how']} on {e['n_images']:,} images)")
    return s, how


def parity_for(backend: str, device: str, model: str, parity: dict | None) -> dict:
    """The parity entry of one row."""
    if backend in ("numpy-mlp", "torch-torchvision"):
        return {"status": "reference", "detail": "the specification itself"}
    if parity is None:
        return {"status": "not run", "detail": "--no-parity or the parity run failed"}
    # the tuned torch rows feed the same device pipeline: its check is theirs
    key = "torch-device" if backend in TORCH_DEVICE_PIPELINE else (
        f"{model}:xla" if backend == "jax-cnn" and device == "gpu" else model)
    c = parity.get("checks", {}).get(key)
    if c is None:
        return {"status": "not run", "detail": f"no parity check for {key}"}
    return {"status": "pass" if c["passed"] else ("error" if c.get("error") else "FAIL"),
            "check": key, "detail": c.get("summary", "")}


# ------------------------------------------------------------------ table
def _fmt_ips(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:,.0f} [{s['min']:,.0f}-{s['max']:,.0f}]"


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def full_batch_lines(rows: list[dict]) -> list[str]:
    """One line per MLP model: seconds per full-batch epoch of each backend (median of the
    timed epochs), and the ratio to the reference's, same run."""
    by_model: dict = {}
    for r in rows:
        fb = r.get("full_batch") if r.get("ok") else None
        if fb:
            n = r.get("n_devices", 1)  # a multi-device row is named as such, not a twin
            name = r["backend"] if n == 1 else f"{r['backend']} ({n} devices)"
            by_model.setdefault((r["model"], r["device"]), []).append((name, fb))
    lines = []
    for (model, device), entries in sorted(by_model.items()):
        ref = dict(entries).get(REFERENCE["mlp"])
        parts = []
        for backend, fb in entries:
            s = fb["seconds"]["median"]
            ratio = (f", {ref['seconds']['median'] / s:.2f}x" if ref is not None
                     and backend != REFERENCE["mlp"] else "")
            parts.append(f"{backend} {s:.3f} s [{fb['seconds']['min']:.3f}-"
                         f"{fb['seconds']['max']:.3f}]{ratio}")
        lines.append(f"full-batch epoch, {model} on {device} ({entries[0][1]['n_images']:,} "
                     f"images, {entries[0][1]['hyperparameters']['preset']} lr): "
                     + "; ".join(parts))
    return lines


def ratio_cell(r: dict) -> str:
    """The "x ref" cell: the training ratio to the family reference, which names the
    reference's device where it is not the row's (the spec's CPU row, where it has no GPU
    row): that ratio is across devices."""
    ratio = r["train"].get("ratio_vs_reference")
    if ratio is None:
        return "-"
    ref_dev = (r.get("reference") or "").rpartition("/")[2]
    return f"{ratio:.2f}x" + (f" vs {ref_dev}" if ref_dev and ref_dev != r["device"] else "")


def budget_cell(b: dict) -> str:
    """The budget accuracy: the mean ± sample std over the seeds, or one seed's value."""
    std = b.get("test_accuracy_std")
    return f"{b['test_accuracy']:.2f}" + ("" if std is None else f" ± {std:.2f}")


def render_table(doc: dict) -> str:
    rows = doc["rows"]
    head = ["backend", "dev", "n", "model", "train img/s median [min-max]", "x ref", "roof",
            "scaling",
            "eval img/s median [min-max]", "epoch s", "compile s", "peak RSS MiB",
            "budget acc %", "parity"]
    lines = []
    body = []
    for r in rows:
        n = r.get("n_devices", 1)
        if not r.get("ok"):
            body.append([r["backend"], r["device"], n, r["model"],
                         "FAILED: " + r.get("error", "")] + [""] * 9)
            continue
        t, e, ep = r["train"], r["eval"], r["epoch"]
        epoch_s = f"{ep['seconds']:.2f}" + (" (est.)" if ep["how"] == "estimated" else "")
        comp = t["compile_s"]
        acc = "absent" if r["budget"] is None else budget_cell(r["budget"])
        mem = f"{r['memory']['peak_rss_mib']:,.0f}"
        if r["memory"]["peak_device_mib"] is not None:
            mem += f" (dev {r['memory']['peak_device_mib']:,.0f})"
        body.append([r["backend"], r["device"], n, r["model"], _fmt_ips(t["images_per_s"]),
                     ratio_cell(r), _fmt(t.get("roofline"), ".0%"),
                     _fmt(t.get("scaling_efficiency"), ".2f"),
                     _fmt_ips(e["images_per_s"]), epoch_s, _fmt(comp, ".1f"), mem, acc,
                     r["parity"]["status"]])
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa
    lines.append(fmt(head))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(b) for b in body)
    cfg = doc["config"]
    lines.append("")
    d = doc["data"]
    if d["synthetic"]:
        lines.append(f"data: SYNTHETIC random images ({d['how']}). Accuracy columns are absent: "
                     f"get CIFAKE from {KAGGLE_URL} and pass --data PATH/cifake.zip "
                     f"(or set CIFAKE_PATH).")
    else:
        lines.append(f"data: {d['path']} ({d['how']}); {d['n_train']:,} train / "
                     f"{d['n_test']:,} test images")
        n_seeds = cfg.get("budget_seeds", 1)
        seeds = f"seed {cfg['seed']}" if n_seeds == 1 else \
            f"mean ± sample std over seeds {cfg['seed']}-{cfg['seed'] + n_seeds - 1}"
        lines.append(f"budget: {cfg['budget_epochs']} epoch(s) on the first "
                     f"{cfg['budget_subset']} training images per class, {seeds}, "
                     f"same initial weights and batch order per family, each model's spec "
                     f"preset; accuracy on the whole test split")
    lines.append(f"throughput: median [min-max] of {cfg['repeats']} timed passes; compilation "
                 f"and warm-up excluded (compile s = first call incl. compilation, JIT backends); "
                 f"x ref = vs {REFERENCE['mlp']} (MLP) / {REFERENCE['cnn']} (CNN); "
                 f"epoch s (est.) = n_train / median train img/s")
    lines.append("n = devices the row trains on; scaling = train img/s on n devices / "
                 "(n x img/s on one), 1.00 = perfect")
    lines.extend(machine_lines(doc.get("machine")))
    lines.extend(full_batch_lines(rows))
    lines.append("")
    lines.append("headline figures (this run):")
    for g in doc["headlines"]:
        v = "-" if g["value"] is None else f"{g['value']} {g['unit']}"
        extra = (f"; torch-torchvision: {g['torch_torchvision_s']} s"
                 if g.get("torch_torchvision_s") is not None else "")
        lines.append(f"  {g['what']}: {v} ({g['how']}{extra})")
    for n in doc["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def machine_lines(m: dict | None) -> list[str]:
    if not m:
        return ["machine: not measured (roof column empty)"]
    b, a = m.get("before"), m.get("after")
    drift = (f" (before the rows {b['sgemm_gflops']:.0f}, after {a['sgemm_gflops']:.0f})"
             if a and b else "")
    return [f"machine: sgemm {m['sgemm_gflops']:.0f} GFLOP/s{drift}; memory copy "
            f"{m['copy_gbps']:.1f} GB/s (256 MiB), {m['copy_cache_gbps']:.1f} GB/s (4 MiB)",
            "roof = CPU training FLOPs/s (img/s x FLOPs per image: the products of forward, "
            "weight and input gradients) / that sgemm rate"]


# ------------------------------------------------------------------ chart
def _times(r: dict) -> str:
    n = r.get("n_devices", 1)
    return f" x{n}" if n > 1 else ""


def render_chart(doc: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in doc["rows"] if r.get("ok")]
    labels = [f"{r['backend']}\n{r['device']}{_times(r)} {r['model']}" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.8))
    if rows:
        med = [r["train"]["images_per_s"]["median"] for r in rows]
        lo = [m - r["train"]["images_per_s"]["min"] for m, r in zip(med, rows)]
        hi = [r["train"]["images_per_s"]["max"] - m for m, r in zip(med, rows)]
        colors = ["tab:blue" if r["family"] == "mlp" else "tab:orange" for r in rows]
        a1.bar(range(len(rows)), med, yerr=[lo, hi], color=colors, capsize=4)
        a1.set_yscale("log")
        a1.set_xticks(range(len(rows)), labels, fontsize=7)
    a1.set_ylabel("training images/s (median, min-max; log)")
    a1.set_title("training throughput (blue MLP, orange CNN)")
    acc_rows = [r for r in rows if r.get("budget")]
    if acc_rows:
        a2.bar(range(len(acc_rows)), [r["budget"]["test_accuracy"] for r in acc_rows],
               yerr=[r["budget"].get("test_accuracy_std") or 0.0 for r in acc_rows],
               color=["tab:blue" if r["family"] == "mlp" else "tab:orange" for r in acc_rows])
        a2.set_xticks(range(len(acc_rows)),
                      [f"{r['backend']}\n{r['device']}{_times(r)} {r['model']}"
                       for r in acc_rows], fontsize=7)
        a2.set_ylim(0, 100)
        a2.set_ylabel("test accuracy % (fixed budget; mean ± std over seeds)")
        c = doc["config"]
        a2.set_title(f"accuracy after {c['budget_epochs']} epoch(s) on {2 * c['budget_subset']} imgs")
    else:
        a2.text(0.5, 0.5, "accuracy absent:\nsynthetic data (no CIFAKE)", ha="center",
                va="center", transform=a2.transAxes)
        a2.set_axis_off()
    fig.suptitle(f"bench.compare {doc['timestamp']} ({doc['environment']['cpu_model']})",
                 fontsize=9)
    fig.tight_layout()
    return png_bytes(fig, dpi=110)


# ------------------------------------------------------------------ main
# What each figure of bench.json is, written into the file itself.
METHODS = {
    "train_images_per_s": "images per second over whole training steps (batch gather, "
                          "augmentation, host->device input, forward, backward, update), "
                          "device synchronised before each clock read; median/min/max of "
                          "the timed passes; first pass excluded (compile_s / warmup_s)",
    "eval_images_per_s": "eval-mode logits, after one untimed warm-up call",
    "epoch": "MLP: measured (timed full-epoch passes); CNN: measured on a GPU or with "
             "--measure-cnn-epoch (one full epoch after warm-up), else 'estimated' = "
             "n_train / median train images/s",
    "full_batch": "MLPs: seconds per full-batch gradient-descent epoch over the "
                  "whole training split, median of the timed epochs after one "
                  "untimed warm-up epoch (data preparation, compilation)",
    "memory": "peak ru_maxrss of the backend's own worker process; GPU: "
              "torch.cuda.max_memory_allocated / JAX memory_stats peak_bytes_in_use",
    "budget": "per seed: the spec's initial weights for the seed (same for every "
              "backend of a family), budget_epochs epochs over the first "
              "budget_subset training images per class with the spec preset's "
              "hyperparameters, test accuracy on the whole test split; "
              "test_accuracy is the mean over the seeds, test_accuracy_std their "
              "sample std (None for one seed), per_seed each seed's figures",
    "ratio_vs_reference": "median / the reference backend's median, same model, same run",
    "n_devices": "devices the row trains on, data-parallel when more than one (JAX: "
                 "a jax.sharding Mesh; torch: DistributedDataParallel, one process "
                 "per GPU under torchrun); the global batch is the preset's",
    "scaling_efficiency": "images/s on n devices / (n x images/s of the same "
                          "backend's 1-device row), training and evaluation",
    "parity": "bench.speed.parity: JAX vs spec on one small batch from converted weights"}


def _config(args) -> tuple[dict, dict]:
    """(the measurement sizes and selection of this run, the defaults they came from)."""
    base = QUICK if args.quick else DEFAULTS
    cfg = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v)
           for k, v in base.items()}
    cfg.update(seed=args.seed, measure_cnn_epoch=args.measure_cnn_epoch, quick=args.quick,
               jax_conv=args.jax_conv,
               backends=args.backends, models=args.models, devices=args.devices)
    if cfg["seed"] + cfg["budget_seeds"] > flags.SEED_LIMIT:
        raise UserError(f"--seed {cfg['seed']} with --budget-seeds {cfg['budget_seeds']}: the "
                        f"last seed would pass {flags.SEED_LIMIT - 1}")
    for model in args.models:  # before any slow step: a selection that cannot run is one line
        fam = family_of(model)
        if not any(BACKENDS[b].family == fam for b in args.backends):
            raise UserError(f"--models {model}: none of the chosen backends "
                            f"({', '.join(args.backends)}) runs {fam.upper()} models")
    return cfg, base


def _data_info(args, cfg: dict) -> dict:
    """Where the images come from; CIFAKE's decoded cache is built once, before the workers."""
    data_path, how = resolve_data(args)
    info = {"synthetic": data_path is None, "path": data_path, "how": how}
    if data_path is None:
        print(f"[bench] data: {how}", file=sys.stderr, flush=True)
        return {**info, "n_train": cfg["synthetic_train"], "n_test": cfg["synthetic_test"]}
    from data import load_cifake
    print(f"[bench] data: {data_path} ({how})", file=sys.stderr, flush=True)
    ds = load_cifake(data_path, args.cache_dir, verbose=True)
    return {**info, "n_train": len(ds.train), "n_test": len(ds.test)}


def _write_inits(models, seeds, folder: str) -> dict[str, list[str]]:
    """The accuracy budget starts every backend of a family from the same weights: the
    spec's init for each seed, written once per model into ``folder`` (not a result)."""
    files = {}
    for m in models:
        paths = [str(Path(folder) / f"init-{m}-s{sd}.safetensors") for sd in seeds]
        for sd, path in zip(seeds, paths):
            save_safetensors(path, spec_init_weights(m, sd), {"model": m, "seed": str(sd)})
        files[m] = paths
    return files


def _run_rows(args, runs, cfg: dict, base: dict, data_path, seeds, inits) -> list[dict]:
    """One worker process per (backend, device, model, devices): its row, or its error."""
    rows = []
    for i, (b, d, m, n) in enumerate(runs, 1):
        on = f"{n} x {d}" if n > 1 else d
        print(f"[bench] ({i}/{len(runs)}) {b} on {on}, model {m}", file=sys.stderr, flush=True)
        spec = {"backend": b, "device": d, "model": m, "n_devices": n, "data": data_path,
                "cache_dir": args.cache_dir, **{k: cfg[k] for k in base},
                "seed": cfg["seed"], "measure_cnn_epoch": cfg["measure_cnn_epoch"],
                "budget_seed_list": seeds, "init_weights": inits.get(m),
                "jax_conv": args.jax_conv}
        res, err = run_worker(worker_argv(b, spec), worker_env(b, d), args.worker_timeout)
        if res is None:
            res = {"ok": False, "backend": b, "device": d, "model": m, "error": err}
        res.setdefault("family", BACKENDS[b].family)
        res.setdefault("n_devices", n)
        rows.append(res)
    return rows


def _run_parity(args, runs, notes: list[str]) -> dict | None:
    """bench.speed.parity for the models and formulations this run timed (None: not run)."""
    if args.no_parity:
        return None
    want = sorted({m for (b, _, m, _) in runs if b.startswith("jax")})
    # the port uses lax.conv on a GPU: check that formulation too (computed on the CPU)
    want += sorted({f"{m}:xla" for (b, d, m, _) in runs if b == "jax-cnn" and d == "gpu"})
    if args.jax_conv:  # the formulation asked for, wherever it was timed
        want += sorted({f"{m}:{args.jax_conv}" for (b, _, m, _) in runs if b == "jax-cnn"})
    checks = want + (["torch-device"] if any(b in TORCH_DEVICE_PIPELINE
                                             for b, _, _, _ in runs) else [])
    if not checks:
        return None
    print(f"[bench] parity checks: {', '.join(checks)}", file=sys.stderr, flush=True)
    parity, err = run_worker(["bench.speed.parity", "--json", "--checks", ",".join(checks)],
                             worker_env("jax-cnn", "cpu"), args.worker_timeout)
    if parity is None:
        notes.append(f"parity run failed: {err}")
    return parity


def _environment(probe: dict) -> dict:
    keys = ("python", "numpy", "torch", "torchvision", "jax", "flax", "optax", "platform",
            "threads", "torch_threads", "jax_backend")
    return {"cpu_model": cpu_model(), "gpu": probe.get("torch_gpu") or probe.get("jax_gpu"),
            **{k: probe.get(k) for k in keys}, "probe": probe, "git": git_commit()}


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.cache_dir:
        args.cache_dir = user_path(args.cache_dir)
    cfg, base = _config(args)
    data_info = _data_info(args, cfg)
    timestamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir(args.out or Path("results") / "bench" / timestamp)

    print("[bench] probing libraries and devices", file=sys.stderr, flush=True)
    libs = sorted({BACKENDS[b].gpu for b in args.backends if BACKENDS[b].gpu})
    probe, err = run_worker(["bench.speed.worker", "--probe", *libs],
                            worker_env("numpy-mlp", "cpu"), 300)
    if probe is None:
        raise UserError(f"could not probe the environment: {err}")
    runs, notes = plan_runs(args, probe)
    machine_before = measure_machine(notes)
    seeds = [cfg["seed"] + k for k in range(cfg["budget_seeds"])]
    with tempfile.TemporaryDirectory(prefix="bench-init-") as tmp:
        inits = _write_inits(args.models, seeds, tmp) if data_info["path"] else {}
        rows = _run_rows(args, runs, cfg, base, data_info["path"], seeds, inits)
    if any(n > 1 and d == "cpu" for _, d, _, n in runs):
        notes.append("the CPU rows on several devices are JAX's forced host devices: they "
                     "share this machine's cores with each other, so their scaling says "
                     "how the split costs, not what more hardware gives")
    parity = _run_parity(args, runs, notes)
    for r in rows:
        if r.get("ok"):
            r["parity"] = parity_for(r["backend"], r["device"], r["model"], parity)
    machine = machine_summary(machine_before, measure_machine(notes))
    add_ratios(rows)
    add_scaling(rows)
    add_roofline(rows, machine)
    notes += sorted({n for r in rows if r.get("ok") for n in r.get("notes", [])})
    notes.append("the machine may be shared: throughput is what it was during this run "
                 "(see min-max spread)")
    command = [PROG] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
    doc = {"schema": SCHEMA, "timestamp": timestamp, "command": " ".join(command),
           "config": cfg, "data": data_info, "environment": _environment(probe),
           "machine": machine, "methods": METHODS, "rows": rows, "parity": parity,
           "headlines": headlines(rows, args.models), "notes": notes,
           "wall_seconds": time.perf_counter() - t_start}
    table = render_table(doc)
    atomic_write_json(out / "bench.json", doc)
    atomic_write_bytes(out / "table.txt", (table + "\n").encode())
    if not args.no_chart:
        atomic_write_bytes(out / "bench.png", render_chart(doc))
    print(table)
    print(f"\nwrote {out}/bench.json, table.txt" + ("" if args.no_chart else ", bench.png")
          + f" in {doc['wall_seconds']:.0f} s")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    run_cli(main, prog=PROG)
