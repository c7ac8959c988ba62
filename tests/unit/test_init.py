"""Same seed -> bit-identical initial weights in every stack of a family, and a run started
under another init scheme refuses to resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.init import INIT_SCHEME, cnn_init, mlp_init
from jax_port import convert
from jax_port import model as JM
from numpy_mlp import model as NM
from tests.helpers import make_archive


@pytest.mark.parametrize("name", ["baseline", "dropout", "v3", "net4"])
@pytest.mark.parametrize("seed", [0, 7])
def test_cnn_epoch0_weights_identical_in_torch_and_jax(name, seed):
    from torch_cnn.model import init_model
    t = {k: v.detach().numpy() for k, v in init_model(name, seed).state_dict().items()}
    j = convert.cnn_to_canonical(JM.init_variables(JM.get_spec(name), seed))
    assert list(t) == list(j)
    for k in t:
        assert t[k].dtype == j[k].dtype, k
        np.testing.assert_array_equal(t[k], j[k], err_msg=k)


@pytest.mark.parametrize("model,hidden", [("mlp2", [12]), ("mlp2", [7]), ("mlp4", [20, 7, 5])])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mlp_epoch0_weights_identical_in_numpy_and_jax(model, hidden, dtype):
    import jax
    with jax.enable_x64(dtype == np.float64):
        n = NM.init_params(NM.layer_dims_for(model, hidden), 3, dtype)
        j = convert.mlp_to_canonical(JM.init_variables(JM.get_spec(model, hidden), 3, dtype))
    assert set(n) == set(j)
    for k in n:
        assert n[k].dtype == j[k].dtype, k
        np.testing.assert_array_equal(n[k], j[k], err_msg=k)


def test_cnn_init_follows_torch_default_distributions():
    sd = cnn_init("v3", 0)
    for name, fan_in in (("conv1", 27), ("conv2", 288), ("fc1", 4096), ("fc2", 512)):
        for part in ("weight", "bias"):
            a = sd[f"{name}.{part}"]
            bound = 1 / np.sqrt(fan_in)
            assert a.dtype == np.float32 and np.abs(a).max() <= bound
            if a.size > 500:  # uniform: the spread covers the interval
                assert np.abs(a).max() > 0.95 * bound and abs(a.mean()) < 0.1 * bound
    assert (sd["bn1.weight"] == 1).all() and (sd["bn2.running_var"] == 1).all()
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    assert "bn1.weight" not in cnn_init("dropout", 0)
    assert not np.array_equal(cnn_init("v3", 1)["fc1.weight"], sd["fc1.weight"])
    w = mlp_init([3072, 12, 1], 0, np.float64)["W1"]
    assert abs(w.std() - np.sqrt(2 / 3072)) < 0.05 * np.sqrt(2 / 3072)


def test_cnn_init_draws_of_the_original_models_are_unchanged():
    """sha256 over names and bytes of cnn_init(model, 0), recorded before net4 joined the
    catalog (the draws are the shared contract every stack and every golden run start from)."""
    import hashlib
    want = {"baseline": "afa0f9f6df693b1b", "dropout": "afa0f9f6df693b1b",
            "v3": "ca6dd99e29c59bb8"}
    for name, fingerprint in want.items():
        h = hashlib.sha256()
        for k, a in cnn_init(name, 0).items():
            h.update(k.encode())
            h.update(a.tobytes())
        assert h.hexdigest()[:16] == fingerprint, name


def test_net4_init_follows_torch_default_distributions():
    sd = cnn_init("net4", 0)
    for name, fan_in in (("stem.conv", 27), ("block1.conv1", 144), ("block3.conv2", 1152),
                         ("fc", 128)):
        a = sd[f"{name}.weight"]
        assert a.dtype == np.float32 and 0.9 / np.sqrt(fan_in) < np.abs(a).max() <= 1 / np.sqrt(fan_in)
    assert np.abs(sd["fc.bias"]).max() <= 1 / np.sqrt(128)
    assert "stem.conv.bias" not in sd and "block1.conv1.bias" not in sd  # convs without bias
    assert (sd["block2.bn1.weight"] == 1).all() and (sd["stem.bn.running_var"] == 1).all()
    assert sd["block3.bn2.num_batches_tracked"].dtype == np.int64


def _run(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # UserError -> what run_cli would print
        from data.errors import UserError
        if not isinstance(e, UserError):
            raise
        return 2, str(e)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("stack,model", [("numpy_mlp", "mlp2"), ("torch_cnn", "baseline"),
                                         ("jax_port", "baseline")])
def test_resume_refuses_a_run_of_another_init_scheme(stack, model, tmp_path, capsys):
    import importlib
    main = importlib.import_module(f"{stack}.train").main
    zp = make_archive(tmp_path / "a.zip", n_train=4, n_test=2)
    run = tmp_path / "run"
    common = ["--data", str(zp), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    code, err = _run(main, ["--model", model, "--epochs", "1", "--batch-size", "4",
                            "--out", str(run), *common], capsys)
    assert code == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init"] == INIT_SCHEME
    del cfg["init"]  # a run made before the shared NumPy init existed
    (run / "config.json").write_text(json.dumps(cfg))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, err = _run(main, ["--out", str(run), "--resume", "--epochs", "2", *common[2:]], capsys)
    assert code != 0 and "init scheme" in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing rewritten
