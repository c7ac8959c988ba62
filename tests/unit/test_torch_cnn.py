"""torch_cnn: models, pipelines, checkpoints, train/predict CLIs (fast: tiny data, few steps)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from core.rundir import RUN_FORMAT
from data import Split
from data.batching import augment, augment_draws, epoch_order
from data.errors import UserError
from core.architecture import cnn_tensors
from core.tensors import load_safetensors
from tests.helpers import REPO, make_archive, synthetic_image, train_argv
from torch_cnn import checkpoint, predict, train
from torch_cnn.model import MODELS, build_model, init_model, param_count
from torch_cnn.pipeline import DevicePipeline, augment_torch, to_input, torchvision_loader

torch.set_num_threads(1)  # the test machine is shared; tiny tensors gain nothing from threads


def fake_split(n: int, seed: int = 0) -> Split:
    g = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.uint8)
    images = np.stack([synthetic_image(int(l), i) for i, l in enumerate(labels)])
    # a few saturated pixels on the borders, so crops/flips of the edges are visible
    images[:, 0, :, :] = g.integers(0, 256, size=(n, 32, 3), dtype=np.uint8)
    return Split(images, labels, np.zeros(n, np.uint8), np.array([b"%020d" % i for i in range(n)]),
                 np.array([f"x/{i}.jpg" for i in range(n)]))


# ------------------------------------------------------------------ models
def expected_params(name: str) -> int:
    if name == "net4":  # convs without bias, BN scale and shift after each, fc 128 -> 1
        convs = 9 * (3 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 64 * 64 + 64 * 128 + 128 * 128)
        bn = 2 * (16 + 2 * 32 + 2 * 64 + 2 * 128)
        return convs + bn + 128 + 1
    conv1 = 3 * 32 * 3 * 3 + 32
    conv2 = 32 * 64 * 3 * 3 + 64
    fc1 = 64 * 8 * 8 * 512 + 512
    fc2 = 512 * 1 + 1
    bn = (32 + 32) + (64 + 64) if name == "v3" else 0  # gamma and beta of each BN
    return conv1 + conv2 + fc1 + fc2 + bn


@pytest.mark.parametrize("name", MODELS)
def test_shapes_param_counts_and_names(name):
    m = init_model(name, 0)
    assert param_count(m) == expected_params(name)
    assert {"baseline": 2_117_569, "dropout": 2_117_569, "v3": 2_117_761,
            "net4": 291_793}[name] == expected_params(name)
    x = torch.rand(5, 3, 32, 32)
    m.eval()
    out = m(x)
    assert out.shape == (5,) and out.dtype == torch.float32
    # channels_last input (and model) give the same logits up to float rounding
    out_cl = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", ""))
              for k, v in m.state_dict().items()}
    assert shapes == cnn_tensors(name)
    assert ("bn1.weight" in shapes) == (name == "v3")


@pytest.mark.parametrize("name", MODELS)
def test_train_flops_count_the_layers_torch_runs(name):
    """core.architecture.train_flops against a count taken from the running model: every
    Conv2d's and Linear's multiply-adds per image from the shapes torch actually produces
    (forward hooks, in execution order), then forward + weight gradients + the input
    gradients of all but the first layer, 2 FLOPs per multiply-add."""
    from core.architecture import layer_macs, train_flops
    m = build_model(name).eval()
    macs = []

    def hook(mod, inputs, out):
        if isinstance(mod, torch.nn.Conv2d):  # outputs per image x (C_in * kh * kw)
            k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
            macs.append(out[0].numel() * k)
        else:
            macs.append(mod.in_features * mod.out_features)
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        m(torch.rand(2, 3, 32, 32))
    assert macs == layer_macs(name)
    assert train_flops(name) == 2 * (2 * sum(macs) + sum(macs[1:]))
    if name == "net4":  # ~2.9x v3's per training image (core/architecture.py's docstring)
        assert train_flops("net4") / train_flops("v3") == pytest.approx(2.907, abs=1e-3)


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = init_model("v3", 1), init_model("v3", 1), init_model("v3", 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_dropout_random_in_train_deterministic_in_eval():
    m, x = init_model("dropout", 0), torch.rand(4, 3, 32, 32)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))
    base = init_model("baseline", 0).train()  # no dropout: train mode is deterministic
    assert torch.equal(base(x), base(x))


def test_batchnorm_batch_stats_in_train_running_stats_in_eval():
    m, x = init_model("v3", 0), torch.rand(8, 3, 32, 32)
    m.dropout.p = 0.0  # isolate BN
    m.train()
    alone, together = m(x[:2]), m(x)[:2]
    assert not torch.allclose(alone, together)  # depends on the other images of the batch
    assert int(m.bn1.num_batches_tracked) == 2 and not torch.equal(m.bn1.running_mean,
                                                                   torch.zeros(32))
    m.eval()
    rm = m.bn1.running_mean.clone()
    torch.testing.assert_close(m(x[:2]), m(x)[:2], rtol=1e-5, atol=1e-6)
    assert torch.equal(m.bn1.running_mean, rm)  # eval does not update running stats


# ------------------------------------------------------------------ pipelines
def test_augment_torch_equals_numpy_reference_bit_for_bit():
    g = np.random.default_rng(3)
    imgs = g.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    d = augment_draws(5, 2, 40)
    dy, dx, flip = d.dy.copy(), d.dx.copy(), d.flip.copy()
    # the edges: offsets 0 and 8 on both axes, flipped and not
    dy[:8], dx[:8] = [0, 0, 8, 8, 0, 8, 4, 4], [0, 8, 0, 8, 8, 0, 0, 8]
    flip[:8] = [True, False, True, False, False, True, True, False]
    from data.batching import AugDraws
    ref = augment(imgs, AugDraws(dy, dx, flip))
    got = augment_torch(torch.from_numpy(imgs), torch.from_numpy(dy), torch.from_numpy(dx),
                        torch.from_numpy(flip))
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), ref)
    assert set(np.unique(d.dy)) <= set(range(9))


def test_device_pipeline_follows_epoch_order_and_shared_draws():
    split = fake_split(23)
    pipe = DevicePipeline(split, "cpu")
    xs, ys = zip(*pipe.batches(seed=7, epoch=3, batch_size=10, augment=True))
    assert [len(y) for y in ys] == [10, 10, 3]  # last partial batch kept
    order = epoch_order(7, 3, 23)
    ref = augment(split.images[order], augment_draws(7, 3, 23))
    expect = torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(torch.cat(xs), expect)
    assert torch.equal(torch.cat(ys), torch.from_numpy(split.labels[order].astype(np.float32)))
    # channels_last gives the same values in the other memory format
    x_cl = next(DevicePipeline(split, "cpu", channels_last=True).batches(7, 3, 10, True))[0]
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(x_cl, xs[0])


def test_to_input_is_pixels_over_255():
    u8 = torch.arange(256, dtype=torch.uint8).repeat(3 * 32 * 32 // 256 + 1)[:3072]
    u8 = u8.reshape(1, 32, 32, 3)
    from data.batching import to_float
    assert torch.equal(to_input(u8), torch.from_numpy(to_float(u8.numpy())).permute(0, 3, 1, 2))


def test_torchvision_and_device_pipelines_agree_without_augmentation():
    split = fake_split(21)
    a = list(DevicePipeline(split, "cpu").batches(1, 1, 8, augment=False))
    b = list(torchvision_loader(split, 1, 1, 8, augment=False, num_workers=0))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_torchvision_augmentation_is_seeded_and_real():
    split = fake_split(12)
    one = torch.cat([x for x, _ in torchvision_loader(split, 1, 1, 6, augment=True)])
    two = torch.cat([x for x, _ in torchvision_loader(split, 1, 1, 6, augment=True)])
    other = torch.cat([x for x, _ in torchvision_loader(split, 1, 2, 6, augment=True)])
    plain = torch.cat([x for x, _ in torchvision_loader(split, 1, 1, 6, augment=False)])
    assert torch.equal(one, two) and not torch.equal(one, plain)
    assert not torch.equal(one, other[torch.argsort(torch.from_numpy(epoch_order(1, 2, 12)))]
                           [torch.from_numpy(epoch_order(1, 1, 12))])


# ------------------------------------------------------------------ training
def test_a_few_steps_lower_the_loss():
    split = fake_split(16)
    x, y = next(DevicePipeline(split, "cpu").batches(0, 1, 16, augment=False))
    m = init_model("baseline", 0)
    opt = train.make_optimizer(m, 1e-3)
    losses = [float(train.train_step(m, opt, x, y)[0]) for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]
    _, n_correct = train.train_step(m, opt, x, y)
    assert 0 <= int(n_correct) <= 16
    logits = train.evaluate(m, split, "cpu", batch_size=5)
    assert logits.shape == (16,) and ((logits > 0) == (split.labels == 1)).mean() >= 0.9


# Run in a fresh process: a denormal times one is zero only on threads that flush them, and the
# 2**22 elements are split between both intra-op threads. The control shows the probe sees the
# threads: threads started before the call keep the slow mode. (Float arithmetic on a thread
# that flushes would zero the probe's own constant, so it is made and read as bits.)
_FTZ_PROBE = """
import sys, torch
from torch_cnn.pipeline import flush_denormals
torch.set_num_threads(2)
what, out = sys.argv[1], sys.argv[2]


def survivors():  # 1e-39 as bits (no float arithmetic on this thread), times one, read as bits
    x = torch.full((1 << 22,), 0x000AE398, dtype=torch.int32).view(torch.float32)
    return int(((x * 1.0).view(torch.int32) != 0).sum())


if what == "train":
    from tests.helpers import make_archive, train_argv
    from torch_cnn import train
    zip_path = make_archive(out + "/tiny.zip", n_train=4, n_test=2)
    assert train.main(train_argv(zip_path, out + "/cache", out + "/run", fresh=(
        "--model", "v3", "--epochs", "1", "--batch-size", "4", "--threads", "2"))) == 0
elif what == "bench":
    from bench.speed.backends import make_backend
    make_backend("torch-device", "v3", "cpu", 0, 1)
    torch.set_num_threads(2)
else:  # control: the threads exist before the call
    survivors()
    flush_denormals()
print(survivors())
"""


@pytest.mark.parametrize("what, survivors", [("train", "none"), ("bench", "none"),
                                              ("late", "some")])
def test_denormals_are_flushed_on_every_training_thread(what, survivors, tmp_path):
    p = subprocess.run([sys.executable, "-c", _FTZ_PROBE, what, str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    n = int(p.stdout.split()[-1])
    assert (n == 0) if survivors == "none" else (0 < n < 1 << 22), (what, n)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("tcnn")
    return make_archive(d / "tiny.zip", n_train=12, n_test=4), d / "cache"


def run_train(archive, out, *extra):
    zip_path, cache = archive
    return train.main(train_argv(zip_path, cache, out, *extra,
                                 fresh=("--batch-size", "8", "--model", "v3", "--threads", "1")))


def weights(run):
    return load_safetensors(run / "model.safetensors")[0]


def test_cli_run_dir_and_bit_identical_resume(archive, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(archive, full, "--epochs", "3") == 0
    # the documented run directory
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["stack"] == "torch_cnn" and cfg["model"] == "v3" and cfg["augment"] is True
    assert cfg["epochs"] == 3 and cfg["batch_size"] == 8 and cfg["device"] == "cpu"
    assert "torch" in cfg["versions"]
    met = json.loads((full / "metrics.json").read_text())
    assert met["complete"] is True and [h["epoch"] for h in met["history"]] == [1, 2, 3]
    for k in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "images_per_s"):
        assert k in met["history"][0]
    fin = met["final"]
    assert fin["train"]["n"] == 24 and fin["test"]["n"] == 8 and fin["test_dedup"]["n"] <= 8
    assert fin["gap_pp"] == pytest.approx(fin["train_acc"] - fin["test_acc"])
    assert sum(map(sum, fin["test"]["confusion"])) == 8
    assert json.loads((full / "state.json").read_text())["epoch_completed"] == 3
    w, meta = load_safetensors(full / "model.safetensors", cnn_tensors("v3"))
    assert meta["family"] == "cnn" and meta["model"] == "v3"
    assert w["bn1.num_batches_tracked"].shape == () and int(w["bn1.num_batches_tracked"]) == 9
    st = load_safetensors(full / "state.safetensors")[0]
    assert "adam.exp_avg.conv1.weight" in st and "adam.exp_avg_sq.fc2.bias" in st

    # 1 epoch, then --resume to 3: bit-identical weights
    assert run_train(archive, part, "--epochs", "1") == 0
    # resumed without --cache-dir: it reuses the run's cache, not the default location
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert train.main(["--out", str(part), "--resume", "--epochs", "3", "--no-progress",
                       "--threads", "1"]) == 0
    assert not (tmp_path / "xdg").exists()
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    hist_a = json.loads((full / "metrics.json").read_text())["history"]
    hist_b = json.loads((part / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]
    # a different seed really changes the result (the comparison above can fail)
    assert run_train(archive, tmp_path / "seed1", "--epochs", "1", "--seed", "1") == 0
    assert not np.array_equal(weights(tmp_path / "seed1")["fc1.weight"], weights(part)["fc1.weight"])


def test_ctrl_c_keeps_last_epoch_and_says_how_to_resume(archive, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = train.train_step

    def interrupting(*a):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 steps per epoch: inside epoch 2
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(train, "train_step", interrupting)
    assert run_train(archive, tmp_path / "r", "--epochs", "3") == 130
    assert json.loads((tmp_path / "r" / "state.json").read_text())["epoch_completed"] == 1
    err = capsys.readouterr().err
    assert "--resume" in err and str(tmp_path / "r") in err


def test_non_finite_loss_stops_with_epoch_and_step(archive, tmp_path, monkeypatch):
    real = train.train_step
    calls = {"n": 0}

    def nan_step(*a):
        calls["n"] += 1
        loss, nc = real(*a)
        return (loss * float("nan") if calls["n"] == 4 else loss), nc
    monkeypatch.setattr(train, "train_step", nan_step)
    with pytest.raises(UserError, match="epoch 2, step 1"):
        run_train(archive, tmp_path / "r", "--epochs", "3")
    assert json.loads((tmp_path / "r" / "state.json").read_text())["epoch_completed"] == 1


@pytest.mark.parametrize("flags, msg", [
    (["--model", "resnet"], "invalid choice"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--lr", "-1"], "--lr must be"),
    (["--batch-size", "many"], "--batch-size"),
    (["--pipeline", "gpu"], "invalid choice"),
    (["--workers", "-2"], "--workers"),
    (["--workers", "2"], "--workers 2 applies to --pipeline torchvision only"),
    (["--resume"], "no run to resume"),
])
def test_bad_flags_fail_clearly(archive, tmp_path, flags, msg):
    with pytest.raises(UserError, match=msg):
        run_train(archive, tmp_path / "r", *flags)


def test_a_flag_the_resumed_run_cannot_honour_is_refused(archive, tmp_path):
    """--workers may change on a resume (how fast, not what), but only where it is used."""
    assert run_train(archive, tmp_path / "r", "--epochs", "1") == 0
    with pytest.raises(UserError, match="--workers 2 applies to --pipeline torchvision only"):
        run_train(archive, tmp_path / "r", "--epochs", "2", "--resume", "--workers", "2")


def test_resume_refuses_changed_hyperparameters(archive, tmp_path):
    assert run_train(archive, tmp_path / "r", "--epochs", "1") == 0
    with pytest.raises(UserError, match="--lr"):
        run_train(archive, tmp_path / "r", "--epochs", "2", "--resume", "--lr", "0.1")
    # a resume state without the Adam tensors is refused with a message naming the file
    (tmp_path / "r" / "state.safetensors").write_bytes(
        (tmp_path / "r" / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="state.safetensors.*missing"):
        run_train(archive, tmp_path / "r", "--epochs", "2", "--resume")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line_exit_2(archive, tmp_path):
    zip_path, cache = archive
    p = subprocess.run([sys.executable, "-m", "torch_cnn.train", "--device", "cuda", "--data",
                        str(zip_path), "--cache-dir", str(cache), "--out", str(tmp_path / "r")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    # the cache may be built first (a test of this module that runs first builds it): its
    # progress lines come before; the refusal is one line, the last
    lines = p.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and "CUDA is not available" in errors[0], p.stderr


# ------------------------------------------------------------------ checkpoint + predict
def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    m = init_model("dropout", 3)
    checkpoint.save(tmp_path / "m.safetensors", m, "dropout")
    m2 = checkpoint.load_into(tmp_path / "m.safetensors", build_model("dropout"))
    assert all(torch.equal(m.state_dict()[k], m2.state_dict()[k]) for k in m.state_dict())
    with pytest.raises(UserError, match="for model 'dropout', not 'baseline'"):
        checkpoint.load_into(tmp_path / "m.safetensors", build_model("baseline"))
    with pytest.raises(UserError, match="does not fit"):
        checkpoint.load_into(tmp_path / "m.safetensors", build_model("v3"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.safetensors"):
        checkpoint.load_into(tmp_path / "bad.safetensors", build_model("baseline"))
    with pytest.raises(UserError, match="not found"):
        checkpoint.load_into(tmp_path / "none.safetensors", build_model("baseline"))


def test_predict_sizes_modes_and_a_broken_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    m = init_model("v3", 0)
    checkpoint.save(run / "model.safetensors", m, "v3")
    (run / "config.json").write_text(json.dumps({"run_format": RUN_FORMAT, "model": "v3", "stack": "torch_cnn"}))
    rgb = synthetic_image(1, 0)
    files = []
    for name, size, mode in [("a.png", 32, "RGB"), ("b.jpg", 64, "L"), ("c.png", 20, "RGBA"),
                             ("d.webp", 100, "RGB")]:
        im = Image.fromarray(rgb).convert(mode).resize((size, size + 3 * (size != 32)))
        im.save(tmp_path / name)
        files.append(str(tmp_path / name))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    args = ["--run", str(run), files[0], str(broken), *files[1:]]
    assert predict.main(args) == 1
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith(files[0]) and "resized" not in lines[0]
    assert "shrunk from 64x67" in lines[1]
    assert len(err.strip().splitlines()) == 1 and "broken.png" in err
    # the printed probability is 1 - sigmoid(logit) of the model on the same input
    x = to_input(torch.from_numpy(np.array(Image.open(files[0]).convert("RGB")))[None])
    p = 1 - torch.sigmoid(m.eval()(x)).item()
    assert f"P(FAKE)={p:.4f}" in lines[0] and lines[0].endswith("FAKE" if p >= 0.5 else "REAL")

    assert predict.main(["--json", "--run", str(run), *files]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["resized"] for r in res] == [False, True, True, True]
    assert res[2]["original_size"] == [20, 23] and res[0]["label"] in ("FAKE", "REAL")
    assert all(0 <= r["p_fake"] <= 1 for r in res)
