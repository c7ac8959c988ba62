"""Data parallelism trains the one-device function: JAX over a Mesh of 2 forced host
devices and torch DDP over 2 gloo processes end with the weights of the 1-device /
1-process run of the same seed, within float32 reduction-order tolerance (the baseline,
v3 on resize-and-compress copies, v3 with the recipe: one-cycle lr, label smoothing,
the weights' moving average, flip TTA; and net4 with its one-cycle lr and flip TTA); the
pieces that make it so (the split of a global batch, the global dropout mask, the
all-reduce BatchNorm) are checked on their own; refusals are one line.

Tolerances (per tensor, relative Frobenius norm ||N devices - 1 device|| / ||1 device||):
the two runs add the same float32 numbers in another order (per-device partial sums
then an all-reduce), ~1e-7 relative per reduction. Adam divides each gradient by its
own running RMS, so a rounding difference in a near-zero gradient component becomes a
step difference of up to ~lr in that weight; over a few steps the tensors stay within
~1e-6 (baseline) and ~1e-3 (v3, whose small BatchNorm biases move by a few such steps)
relative. Measured here (worst tensor): baseline 5e-8 (JAX) / 2.6e-6 (torch, conv1.weight),
v3 5e-6 (JAX, fc1.weight) / 3.7e-4 (torch, bn1.bias); on 200 images, up to 5.5e-4
(JAX v3, bn1.bias). Training with per-process BatchNorm statistics instead of the global
batch's gives 2.4e-1 (bn1.bias) and 8.6e-2 (fc1.weight); per-process dropout masks
6.5e-1. The bounds below sit between, about an order of magnitude from each side.
The convolution biases before a BatchNorm and the running means that carry them are
compared apart (as in test_parity_cnn.py): their true gradient is zero, so Adam walks
them on rounding noise in both runs, by at most ~lr per step.
net4 (7 BatchNorms, three 2x2 max pools and a global max pool that routes each channel's
whole gradient to one position) amplifies rounding far more than v3: torch alone on 1
thread against 2 threads ends 2.5e-3 apart in its BatchNorm biases and 7.5e-5 in the
second epoch's train loss (v3: 2.4e-6 and 1e-7). Measured 1 vs 2: JAX 9.2e-4
(block1.bn1.bias), torch 1.0e-2 (block1.bn2.bias) and 4.7e-4 in the second epoch's loss;
torch with per-process statistics instead: 0.35-1.08 in every BatchNorm bias and 3.7e-3 in
the first epoch's loss. Hence net4's wider bounds (5e-2; loss 1.5e-3), between the two.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from data.batching import rank_rows
from tests.helpers import REPO, assert_ok, assert_same_weights, env, load_weights, \
    make_archive, require_modules

FRO = {"baseline": 1e-4, "v3": 5e-3, "v3-recipe": 5e-3, "net4": 5e-2}
# per-epoch train loss and train images classified otherwise, 1 vs N (net4: see the module
# docstring; a near-zero logit may cross zero on rounding)
LOSS_TOL = {"net4": 1.5e-3}
ACC_IMAGES = {"net4": 1}
# v3 with the recipe (core.recipe: one-cycle lr, label smoothing, the EMA that is saved,
# flip TTA in the sharded evaluation); with --degrade as v3 below
RECIPE = ["--schedule", "onecycle", "--label-smoothing", "0.1", "--ema-decay", "0.99",
          "--tta", "flip"]
# net4 (BatchNorm after each of its 7 convolutions, nested in blocks) with its preset's
# schedule and flip TTA, at the other models' batch of 64
NET4 = ["--schedule", "onecycle", "--tta", "flip"]
LR = 1e-3
EPOCHS = 2
N_TRAIN = 80   # per class: 160 images = 2 batches of 64 + a partial batch of 32
# the biases before v3's BatchNorms and what carries them (see the module docstring)
BN_WALK = ("conv1.bias", "conv2.bias", "bn1.running_mean", "bn2.running_mean")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("scaleout")
    return make_archive(d / "tiny.zip", n_train=N_TRAIN, n_test=10), d


def argv(archive, out, model, *more):
    """A fresh run's flags; v3 also trains on resize-and-compress copies (--degrade), which
    every device and process must see alike."""
    zip_path, d = archive
    extra = {"v3": ["--degrade", "0.5"], "v3-recipe": ["--degrade", "0.5", *RECIPE],
             "net4": NET4}.get(model, [])
    return ["--model", model.split("-")[0], "--epochs", str(EPOCHS), "--seed", "5", "--data",
            str(zip_path), "--cache-dir", str(d / "cache"), "--out", str(out), "--no-progress",
            *extra, *map(str, more)]


def steps() -> int:
    return EPOCHS * -(-2 * N_TRAIN // 64)


def assert_same_function(one, many, model: str) -> dict[str, float]:
    """The N-device run's weights against the 1-device run's; -> the errors measured."""
    a, b = load_weights(one / "model.safetensors"), load_weights(many / "model.safetensors")
    assert sorted(a) == sorted(b)
    errs, bad = {}, {}
    for k in a:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        if k.endswith("num_batches_tracked"):
            assert np.array_equal(x, y), k
            continue
        if model.startswith("v3") and k in BN_WALK:
            errs[k] = float(np.max(np.abs(x - y)))
            if errs[k] > 2 * steps() * LR:
                bad[k] = errs[k]
            continue
        errs[k] = float(np.linalg.norm(x - y) / np.linalg.norm(x))
        if errs[k] > FRO[model]:
            bad[k] = errs[k]
    assert not bad, f"{model}: {bad}"
    h1 = json.loads((one / "metrics.json").read_text())
    hn = json.loads((many / "metrics.json").read_text())
    for r1, rn in zip(h1["history"], hn["history"], strict=True):
        assert abs(r1["train_loss"] - rn["train_loss"]) < LOSS_TOL.get(model, 1e-4)
        assert abs(r1["test_loss"] - rn["test_loss"]) < 1e-3  # evaluation split too
        images = abs(r1["train_acc"] - rn["train_acc"]) * 2 * N_TRAIN / 100
        assert images <= ACC_IMAGES.get(model, 0) + 1e-6
    return errs


# ------------------------------------------------------------------ the pieces
def test_rank_rows_tile_every_global_batch():
    for world in range(1, 9):
        for total in range(0, 70):
            parts = [rank_rows(total, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        rank_rows(8, 2, 2)


def test_global_batch_dropout_rows_are_the_one_process_mask():
    require_modules("torch", extra="torch")
    import torch
    from torch.nn import functional as F

    from torch_cnn.distributed import GlobalBatchDropout
    x = torch.randn(13, 512)
    torch.manual_seed(3)
    want = [F.dropout(x, 0.5, True) for _ in range(2)]  # two steps of one process
    drop = GlobalBatchDropout(0.5).train()
    for world in (2, 3):
        parts = {r: [] for r in range(world)}
        for r in range(world):  # every rank: the same seed, its rows
            torch.manual_seed(3)
            lo, hi = rank_rows(13, r, world)
            drop.rows = (lo, hi, 13)
            parts[r] = [drop(x[lo:hi]) for _ in range(2)]
        for step in range(2):
            got = torch.cat([parts[r][step] for r in range(world)])
            assert torch.equal(got, want[step]), (world, step)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_all_reduce_batchnorm_is_batchnorm2d(tmp_path):
    """Its arithmetic (values, gradients, running statistics) in a world of one, where the
    all-reduces are identities; several processes are the end-to-end test below."""
    require_modules("torch", extra="torch")
    import torch
    import torch.distributed as dist

    from torch_cnn.distributed import _AllReduceBatchNorm
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(6, 4, 5, 5, generator=g) * 3 + 1).requires_grad_()
        w = torch.rand(4, generator=g).requires_grad_()
        b = torch.randn(4, generator=g).requires_grad_()
        up = torch.randn(6, 4, 5, 5, generator=g)
        rm, rv = torch.zeros(4), torch.ones(4)
        y = _AllReduceBatchNorm.apply(x, w, b, rm, rv, 1e-5, 0.1)
        grads = torch.autograd.grad((y * up).sum(), (x, w, b))
        x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
        rm2, rv2 = torch.zeros(4), torch.ones(4)
        y2 = torch.nn.functional.batch_norm(x2, rm2, rv2, w2, b2, True, 0.1, 1e-5)
        grads2 = torch.autograd.grad((y2 * up).sum(), (x2, w2, b2))
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        for a, c in zip(grads, grads2):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rm, rm2)
        torch.testing.assert_close(rv, rv2)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ refusals
def test_devices_that_cannot_be_honoured_are_refused():
    require_modules("jax", "flax", "optax", extra="jax")
    from data.errors import UserError
    from jax_port.train import JaxPort
    count = JaxPort()._device_count
    with pytest.raises(UserError, match=r"--devices 3: the batch of 64 images does not split"):
        count({"batch_size": 64, "devices": 3}, 4, "cpu")
    with pytest.raises(UserError, match=r"--devices 5: JAX sees 4 cpu device"):
        count({"batch_size": 64, "devices": 5}, 4, "cpu")
    assert count({"batch_size": 64, "devices": 2}, 4, "gpu") == 2
    assert count({"batch_size": 64, "devices": None}, 8, "gpu") == 8
    assert count({"batch_size": 64, "devices": None}, 3, "gpu") == 2  # all that split it
    assert count({"batch_size": None, "devices": None}, 3, "gpu") == 3


def test_torch_world_that_does_not_split_the_batch_is_refused(archive, tmp_path, monkeypatch,
                                                              capsys):
    require_modules("torch", "torchvision", extra="torch")
    from data.errors import run_cli
    from torch_cnn import train
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, argv(archive, tmp_path / "r", "baseline"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: --batch-size 64 does not split "
                                                    "evenly over 3 processes"), err


# ------------------------------------------------------------------ end to end
JAX_RUNS = """
import json, sys
from jax_port.train import main
for a in json.loads(sys.argv[1]):
    assert main(a) == 0, a
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["baseline", "v3", "v3-recipe", "net4"])
def test_jax_on_two_devices_trains_the_one_device_weights(archive, tmp_path, model):
    """XLA_FLAGS forces 2 host devices (it must be set before jax is imported: a
    subprocess). v3 also resumes the 2-device run after its first epoch."""
    require_modules("jax", "flax", "optax", extra="jax")
    import subprocess
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [argv(archive, one, model, "--devices", 1)]
    if model == "v3":
        runs += [argv(archive, two, model, "--devices", 2, "--epochs", 1),
                 ["--out", str(two), "--resume", "--epochs", str(EPOCHS), "--no-progress",
                  "--cache-dir", str(archive[1] / "cache")]]
    else:
        runs += [argv(archive, two, model, "--devices", 2)]
    p = subprocess.run([sys.executable, "-c", JAX_RUNS, json.dumps(runs)], cwd=REPO,
                       env=env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                               JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
    assert_ok(p)
    assert json.loads((one / "config.json").read_text())["n_devices"] == 1
    assert json.loads((two / "config.json").read_text())["n_devices"] == 2
    errs = assert_same_function(one, two, model)
    print(f"jax {model} 2 vs 1 device:", json.dumps(errs))


@pytest.mark.slow
def test_jax_on_two_hosts_trains_the_one_device_weights(archive, tmp_path):
    """Two processes with one CPU device each, joined by jax.distributed.initialize from
    the environment (the multi-host start, here on one machine over gloo), beside the
    1-device run; process 1 writes nothing."""
    require_modules("jax", "flax", "optax", extra="jax")
    import socket
    import subprocess
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    one, hosts = tmp_path / "one", tmp_path / "hosts"
    cmd = [sys.executable, "-m", "jax_port.train"]
    procs = [subprocess.Popen(cmd + argv(archive, one, "baseline"), cwd=REPO,
                              env=env(JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    for pid in (0, 1):
        procs.append(subprocess.Popen(
            cmd + argv(archive, hosts, "baseline"), cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env=env(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=pid)))
    errs = []
    for pr in procs:
        _, err = pr.communicate(timeout=300)
        assert pr.returncode == 0 and "Traceback" not in err, err[-3000:]
        errs.append(err)
    assert "done: " in errs[1] and "done: " not in errs[2]  # process 0 alone reports
    cfg = json.loads((hosts / "config.json").read_text())
    assert cfg["processes"] == 2 and cfg["n_devices"] == 2
    print("jax baseline 2 hosts vs 1 device:", json.dumps(assert_same_function(one, hosts,
                                                                               "baseline")))


def torchrun(*args, nproc: int = 2):
    import subprocess
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           str(nproc), "-m", "torch_cnn.train", *map(str, args)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_v3(archive):
    """torchrun --nproc-per-node 2, v3, two epochs (shared by the two tests that need it)."""
    out = archive[1] / "ddp-v3"
    return out, torchrun(*argv(archive, out, "v3"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["baseline", "v3", "v3-recipe", "net4"])
def test_torchrun_on_two_processes_trains_the_one_process_weights(archive, tmp_path, model,
                                                                  ddp_v3):
    require_modules("torch", "torchvision", extra="torch")
    from tests.helpers import run
    one = tmp_path / "one"
    assert_ok(run("torch_cnn.train", *argv(archive, one, model)))
    if model == "v3":
        many, p = ddp_v3
    else:
        many = tmp_path / "many"
        p = torchrun(*argv(archive, many, model))
    assert_ok(p)
    cfg = json.loads((many / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["ddp_backend"] == "gloo"
    assert p.stderr.count("done: ") == 1  # rank 0 alone reports (and writes)
    errs = assert_same_function(one, many, model)
    print(f"torch {model} 2 vs 1 process:", json.dumps(errs))


@pytest.mark.slow
def test_torchrun_resume_is_bit_identical(archive, tmp_path, ddp_v3):
    require_modules("torch", "torchvision", extra="torch")
    straight, p = ddp_v3
    assert_ok(p)
    out = tmp_path / "resumed"
    assert_ok(torchrun(*argv(archive, out, "v3", "--epochs", 1)))
    p = torchrun("--out", out, "--resume", "--epochs", EPOCHS, "--no-progress",
                 "--cache-dir", archive[1] / "cache")
    assert_ok(p)
    assert "resuming" in p.stderr
    assert_same_weights(out / "model.safetensors", straight / "model.safetensors")
    assert_same_weights(out / "state.safetensors", straight / "state.safetensors")
    assert sorted(os.listdir(out)) == sorted(os.listdir(straight))
