"""cifake-export / python -m torch_cnn.export: the ONNX file computes the PyTorch model's
logits (within 1e-5) on a batch of a size other than the one it was traced with."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.rundir import RUN_FORMAT
from tests.helpers import require, require_modules, synthetic_image
from tests.helpers import assert_user_error, run

torch = require("torch")


def cnn_run(tmp_path, model: str):
    """A run of CNN ``model`` whose BatchNorms hold non-trivial running statistics."""
    from torch_cnn import checkpoint
    from torch_cnn.model import build_model
    torch.manual_seed(0)
    m = build_model(model)
    for mod in m.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    d = tmp_path / "run"
    d.mkdir()
    checkpoint.save(d / "model.safetensors", m, model)
    (d / "config.json").write_text(json.dumps({"run_format": RUN_FORMAT, "model": model,
                                               "family": "cnn"}))
    return d


@pytest.fixture
def v3_run(tmp_path):
    """A v3 run (BatchNorm + Dropout)."""
    return cnn_run(tmp_path, "v3")


@pytest.mark.parametrize("name,tta", [("v3", "none"), ("v3", "flip"), ("net4", "flip")])
def test_onnx_logits_match_torch(name, tta, tmp_path, capsys):
    """A run with flip test-time averaging exports it: the graph averages the logits of each
    image and its mirror image, as predict does."""
    require_modules("onnx", "onnxscript", "onnxruntime", extra="export")
    run_dir = cnn_run(tmp_path, name)
    (run_dir / "config.json").write_text(json.dumps({"run_format": RUN_FORMAT, "model": name,
                                                    "family": "cnn", "tta": tta}))
    from data.errors import run_cli
    from torch_cnn import export
    from torch_cnn.pipeline import to_input
    from torch_cnn.predict import load_run
    out = tmp_path / "detector.onnx"
    with pytest.raises(SystemExit) as e:
        run_cli(export.main, ["--run", str(run_dir), "--out", str(out)])
    assert e.value.code == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    imgs = np.stack([synthetic_image(i % 2, i) for i in range(5)])  # traced with a batch of 2
    model = load_run(run_dir)
    with torch.inference_mode():
        want = model(to_input(torch.from_numpy(imgs))).reshape(-1).numpy()
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logit, p_fake = sess.run(["logit", "p_fake"], {"images": imgs})
    assert logit.shape == (5,)
    np.testing.assert_allclose(logit, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(p_fake, 1 / (1 + np.exp(want)), rtol=0, atol=1e-6)
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["model"] == name and meta["family"] == "cnn" and meta["tta"] == tta
    if tta == "flip":  # the mirror image's half is really in the graph: averaging it in
        # moves the logits by far more than the export's own error
        with torch.inference_mode():
            plain = model.model(to_input(torch.from_numpy(imgs))).reshape(-1).numpy()
        assert np.abs(logit - plain).max() > 10 * max(np.abs(logit - want).max(), 1e-7)
    assert not list(tmp_path.glob(".detector.onnx*"))  # written via temp + rename


def test_export_refusals_name_the_value(v3_run, tmp_path):
    assert_user_error(run("torch_cnn.export", "--run", v3_run, "--out", tmp_path / "m.pt"),
                      "m.pt", ".onnx")
    assert_user_error(run("torch_cnn.export", "--run", v3_run, "--out",
                          tmp_path / "nowhere" / "m.onnx"), "nowhere")
    assert_user_error(run("torch_cnn.export", "--run", tmp_path / "nope"), "nope")


def test_cifake_export_is_the_same_command(v3_run, tmp_path, monkeypatch, capsys):
    from tests.helpers import call
    code, out, _ = call("cifake-export", ["--help"], monkeypatch, capsys)
    assert code == 0 and "example:" in out and "RUN_DIR/model.onnx" in out
    code, _, err = call("cifake-export", ["--run", str(v3_run), "--out", "x.bin"],
                        monkeypatch, capsys)
    assert code == 2 and err.startswith("error: torch_cnn.export: --out x.bin")
