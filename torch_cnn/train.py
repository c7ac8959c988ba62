"""Train one of the CNNs on CIFAKE: ``python -m torch_cnn.train --model baseline|dropout|v3``.

Shared flags (data.runs.common_parser) plus ``--model``, ``--device cpu|cuda|auto``,
``--pipeline device|torchvision``, ``--workers`` (torchvision DataLoader workers),
``--channels-last``, ``--threads``. Writes the run directory of the contract
(config.json, metrics.json, model.safetensors, state.safetensors, state.json).

Randomness, all derived from (seed, epoch) so --resume needs no saved RNG state:
  weight init  : torch seeded from data.batching.rng(seed, 2)           (model.init_model)
  batch order  : data.batching.epoch_order(seed, epoch, n)
  augmentation : device pipeline: augment_draws(seed, epoch, n); torchvision pipeline:
                 per-image torch seeds from rng(seed, 11, epoch) (pipeline.py)
  dropout      : torch's global RNG, seeded at the start of each epoch from rng(seed, 3, epoch)
Epochs are numbered from 1 in the history and in the RNG keys.

Crash safety: after each epoch, in this order: metrics.json (history up to the
epoch), state.safetensors (weights as "model.<name>" + Adam tensors
"adam.{exp_avg,exp_avg_sq,step}.<name>", metadata epoch_completed), model.safetensors,
state.json. --resume takes its tensors and epoch from state.safetensors alone
(one atomic file), and the history's first epoch_completed entries, so a kill
between any two writes still resumes consistently.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from data import load_cifake
from data.batching import rng
from data.errors import UserError, run_cli
from data.init import INIT_SCHEME
from data.runs import (atomic_write_json, check_init_scheme, classification_report, common_parser, load_safetensors,
                       positive_int, prepare_out_dir, read_json, resolve_config,
                       save_safetensors)

from . import checkpoint
from .model import MODELS, init_model
from .pipeline import DevicePipeline, to_input, torchvision_loader
from .presets import AUGMENTED_MODELS, DEFAULTS, PRESETS

PROG = "python -m torch_cnn.train"
STACK = "torch_cnn"
EVAL_BATCH = 1000        # images per forward pass in evaluation (memory only, not results)
_STREAM_DROPOUT = 3      # rng(seed, 3, epoch): the data layer's dropout stream
ADAM_BETAS = (0.9, 0.999)  # torch defaults (the original is silent)
ADAM_EPS = 1e-8
PIPELINES = ("device", "torchvision")

# flags that may differ between a run and its --resume (they do not change the results
# on a given device; --epochs extends or shortens the run)
_RESUME_FREE = {"epochs", "device", "threads", "workers", "no_progress", "resume", "out",
                "cache_dir", "data", "preset"}


# ------------------------------------------------------------------ reusable pieces
def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step on a batch. Returns (mean BCE loss, number correct), both as
    detached device tensors (no host sync here)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits, y)
    loss.backward()
    optimizer.step()
    n_correct = ((logits.detach() > 0) == (y > 0.5)).sum()
    return loss.detach(), n_correct


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split, device, batch_size: int = EVAL_BATCH,
             channels_last: bool = False) -> np.ndarray:
    """Logits (N,) float32 of the whole split, in stored order, in eval mode
    (dropout off, BN running statistics). Restores the model's previous mode."""
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    out = []
    for i in range(0, len(split), batch_size):
        imgs = torch.from_numpy(np.ascontiguousarray(split.images[i:i + batch_size])).to(dev)
        out.append(model(to_input(imgs, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: CUDA is not available to this torch "
                        f"{torch.__version__} (no GPU or a CPU-only build); use --device cpu")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # foreach=False: the plain per-parameter loop, the same arithmetic on every device
    return torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                            foreach=False)


def optimizer_tensors(model, optimizer) -> dict[str, np.ndarray]:
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if not st:
            continue
        for k in ("exp_avg", "exp_avg_sq", "step"):
            out[f"adam.{k}.{name}"] = torch.as_tensor(st[k]).detach().cpu().numpy()
    return out


def state_shapes(model, name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected contents of state.safetensors: weights + Adam tensors per parameter."""
    out = {f"model.{k}": v for k, v in checkpoint.expected_shapes(name).items()}
    for pname, p in model.named_parameters():
        shape = tuple(p.shape)
        out.update({f"adam.exp_avg.{pname}": (shape, "float32"),
                    f"adam.exp_avg_sq.{pname}": (shape, "float32"),
                    f"adam.step.{pname}": ((), "float32")})
    return out


def load_optimizer_tensors(model, optimizer, tensors: dict[str, np.ndarray], where) -> None:
    sd = optimizer.state_dict()
    state = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        keys = [f"adam.{k}.{name}" for k in ("exp_avg", "exp_avg_sq", "step")]
        if not all(k in tensors for k in keys):
            raise UserError(f"{where}: Adam state for '{name}' missing")
        ea, eas, step = (torch.from_numpy(np.array(tensors[k])) for k in keys)
        if ea.shape != p.shape or eas.shape != p.shape:
            raise UserError(f"{where}: Adam state for '{name}' has the wrong shape")
        state[i] = {"step": step, "exp_avg": ea, "exp_avg_sq": eas}
    sd["state"] = state
    optimizer.load_state_dict(sd)


def versions() -> dict:
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__}


# ------------------------------------------------------------------ CLI
def build_parser():
    ap = common_parser(PROG, "Train a CIFAKE CNN (baseline | dropout | v3).", PRESETS, decay=False)
    ap.add_argument("--model", choices=MODELS, help="network (default: the preset's, else baseline)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where to train (default auto: cuda when available)")
    ap.add_argument("--pipeline", choices=PIPELINES,
                    help="input pipeline: device (uint8 data on the device, default) or "
                         "torchvision (PIL transforms + DataLoader, as the original)")
    ap.add_argument("--workers", type=lambda s: _nonneg_int("--workers", s),
                    help="DataLoader worker processes for --pipeline torchvision (default 0)")
    ap.add_argument("--channels-last", action=_BoolFlag, nargs=0, dest="channels_last",
                    help="feed channels_last (NHWC-strided) tensors (default: off)")
    ap.add_argument("--no-channels-last", action=_BoolFlag, nargs=0, dest="channels_last")
    ap.add_argument("--threads", type=positive_int("--threads"),
                    help="torch intra-op CPU threads (default: torch's choice)")
    return ap


class _BoolFlag(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        setattr(ns, self.dest, not option_string.startswith("--no-"))


def _nonneg_int(name: str, s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
    return v


def _config(args) -> dict:
    defaults = dict(DEFAULTS, subset=None, pipeline="device", workers=0, channels_last=False)
    cfg = resolve_config(args, PRESETS, defaults)
    if args.model is None and not args.preset:
        cfg["model"] = DEFAULTS["model"]
    cfg["augment"] = cfg["model"] in AUGMENTED_MODELS
    cfg["init"] = INIT_SCHEME
    return cfg


def _fmt_cmd(out: Path) -> str:
    return f"{PROG} --out {out} --resume"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    default_out = Path("runs") / f"{STACK}-{args.preset or args.model or DEFAULTS['model']}"
    out = Path(args.out) if args.out else default_out
    out = prepare_out_dir(out, args.resume)

    if args.resume:
        cfg = read_json(out / "config.json")
        check_init_scheme(cfg, out / "config.json")
        new = _config(args)
        for k, v in vars(args).items():
            if v is not None and k not in _RESUME_FREE and k in cfg and cfg[k] != new[k]:
                raise UserError(f"--resume: --{k.replace('_', '-')} {v} differs from the run's "
                                f"{cfg[k]} ({out / 'config.json'})")
        for k in ("epochs", "workers"):
            if getattr(args, k) is not None:
                cfg[k] = getattr(args, k)
        data_path = args.data or cfg.get("data")
        # a run trained with --cache-dir resumes from the same cache unless told otherwise
        cache_dir = args.cache_dir or cfg.get("cache_dir")
    else:
        cfg = _config(args)
        data_path = args.data
        cache_dir = args.cache_dir
    cfg["cache_dir"] = cache_dir
    cfg.update(stack=STACK, device=str(device), threads=torch.get_num_threads(),
               optimizer="adam", adam_betas=list(ADAM_BETAS), adam_eps=ADAM_EPS,
               eval_batch_size=EVAL_BATCH, versions=versions())

    ds = load_cifake(data_path, cache_dir, subset=cfg["subset"], verbose=not args.no_progress)
    cfg["data"] = ds.manifest.get("source", {}).get("path", data_path)
    test_dedup = ds.test_deduplicated()
    atomic_write_json(out / "config.json", cfg)

    seed, name = int(cfg["seed"]), cfg["model"]
    model = init_model(name, seed).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg["lr"])
    history, start, wall_before = [], 0, 0.0
    if args.resume:
        wall_before = float(read_json(out / "state.json").get("wall_seconds", 0.0))
        tensors, meta = load_safetensors(out / "state.safetensors", state_shapes(model, name))
        if meta.get("model") != name:
            raise UserError(f"{out / 'state.safetensors'}: holds model {meta.get('model')!r}, "
                            f"the run's config says {name!r}")
        start = int(meta.get("epoch_completed", 0))
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        load_optimizer_tensors(model, optimizer, tensors, out / "state.safetensors")
        old = read_json(out / "metrics.json") if (out / "metrics.json").exists() else {}
        history = list(old.get("history", []))[:start]
        if len(history) < start:
            raise UserError(f"{out / 'metrics.json'}: history has {len(history)} epochs, "
                            f"state has {start}")
        print(f"resuming {out} after epoch {start}", file=sys.stderr)

    if cfg["pipeline"] == "device":
        pipe = DevicePipeline(ds.train, device, channels_last=cfg["channels_last"])

        def epoch_batches(epoch):
            return pipe.batches(seed, epoch, cfg["batch_size"], cfg["augment"])
    else:
        def epoch_batches(epoch):
            return torchvision_loader(ds.train, seed, epoch, cfg["batch_size"], cfg["augment"],
                                      num_workers=cfg["workers"], device=device,
                                      channels_last=cfg["channels_last"])

    from tqdm import tqdm
    n_train = len(ds.train)
    bs = cfg["batch_size"] or n_train
    steps = -(-n_train // bs)
    epoch = start
    try:
        for epoch in range(start + 1, cfg["epochs"] + 1):
            # dropout masks of this epoch (manual_seed seeds the CPU and every CUDA generator)
            torch.manual_seed(int(rng(seed, _STREAM_DROPOUT, epoch).integers(0, 2**63 - 1)))
            stats = _train_epoch(model, optimizer, epoch_batches(epoch), epoch, cfg, steps,
                                 device, out, tqdm, args.no_progress)
            test_logits = evaluate(model, ds.test, device, channels_last=cfg["channels_last"])
            rep = classification_report(test_logits, ds.test.labels)
            history.append({"epoch": epoch, "lr": cfg["lr"], **stats,
                            "test_loss": rep["loss"], "test_acc": rep["accuracy"]})
            if not args.no_progress:
                print(f"epoch {epoch}/{cfg['epochs']}: train loss {stats['train_loss']:.4f} "
                      f"acc {stats['train_acc']:.2f}% | test loss {rep['loss']:.4f} "
                      f"acc {rep['accuracy']:.2f}% | {stats['images_per_s']:.0f} img/s",
                      file=sys.stderr)
            _save_epoch(out, model, optimizer, name, epoch, history,
                        wall_before + time.time() - t_start)
    except KeyboardInterrupt:
        done = len(history)
        if done == 0:
            print(f"interrupted during epoch {epoch}; no epoch completed, nothing saved to "
                  f"resume in {out}", file=sys.stderr)
        else:
            print(f"interrupted during epoch {epoch}; epoch {done} is saved in {out}; "
                  f"resume with: {_fmt_cmd(out)}", file=sys.stderr)
        return 130

    # final evaluation in eval mode over whole splits
    cl = cfg["channels_last"]
    final = {"train": classification_report(evaluate(model, ds.train, device, channels_last=cl),
                                             ds.train.labels),
             "test": classification_report(evaluate(model, ds.test, device, channels_last=cl),
                                           ds.test.labels),
             "test_dedup": classification_report(
                 evaluate(model, test_dedup, device, channels_last=cl), test_dedup.labels)}
    final.update(train_acc=final["train"]["accuracy"], test_acc=final["test"]["accuracy"],
                 gap_pp=final["train"]["accuracy"] - final["test"]["accuracy"],
                 test_loss=final["test"]["loss"], test_auc=final["test"]["roc_auc"])
    metrics = {"history": history, "final": final,
               "wall_seconds": wall_before + time.time() - t_start, "complete": True}
    atomic_write_json(out / "metrics.json", metrics)
    if not args.no_progress:
        print(f"done: train {final['train_acc']:.2f}% test {final['test_acc']:.2f}% "
              f"(gap {final['gap_pp']:.2f} pp, test AUC {final['test_auc']:.4f}, "
              f"dedup test {final['test_dedup']['accuracy']:.2f}%) -> {out}", file=sys.stderr)
    return 0


def _train_epoch(model, optimizer, batches, epoch, cfg, steps, device, out, tqdm, no_progress):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg['epochs']}", file=sys.stderr,
               disable=no_progress, leave=False, dynamic_ncols=True)
    loss_sum, correct, seen, n_steps = 0.0, 0, 0, 0
    sync()
    t0 = time.perf_counter()
    try:
        for step, (x, y) in enumerate(batches, 1):
            loss, nc = train_step(model, optimizer, x, y)
            lv = loss.item()  # host sync; also the non-finite check below
            if not math.isfinite(lv):
                raise UserError(f"non-finite training loss ({lv}) at epoch {epoch} step {step}; "
                                f"the last good checkpoint (epoch {epoch - 1}) is kept in {out}; "
                                f"try a smaller --lr")
            loss_sum += lv
            correct += int(nc)
            seen += len(y)
            n_steps += 1
            bar.update(1)
            if step % 20 == 0 or step == steps:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / n_steps:.4f}", acc=f"{100 * correct / seen:.2f}",
                                img_s=f"{seen / max(el, 1e-9):.0f}", refresh=False)
    finally:
        bar.close()
    sync()
    secs = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(n_steps, 1), "train_acc": 100.0 * correct / max(seen, 1),
            "seconds": secs, "images_per_s": seen / max(secs, 1e-9)}


def _save_epoch(out, model, optimizer, name, epoch, history, wall) -> None:
    atomic_write_json(out / "metrics.json", {"history": history, "final": None,
                                             "wall_seconds": wall, "complete": False})
    tensors = {f"model.{k}": v for k, v in checkpoint.state_to_numpy(model).items()}
    tensors.update(optimizer_tensors(model, optimizer))
    save_safetensors(out / "state.safetensors", tensors,
                     {"family": "cnn", "model": name, "epoch_completed": str(epoch)})
    checkpoint.save(out / "model.safetensors", model, name)
    # wall_seconds: this run's wall time so far, summed over resumed invocations
    atomic_write_json(out / "state.json", {"epoch_completed": epoch, "model": name,
                                           "wall_seconds": wall})


if __name__ == "__main__":
    run_cli(main, prog="torch_cnn.train")
