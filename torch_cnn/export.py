"""Export a CNN run to ONNX: ``python -m torch_cnn.export --run RUN_DIR [--out FILE.onnx]``.

The ONNX model takes what the detector takes -- ``images``: uint8 (batch, 32, 32, 3)
RGB, any batch size -- and does the scaling itself (pixels / 255, NCHW), so another
runtime needs no preprocessing code beyond bringing an image to 32x32 RGB. Outputs:
``logit`` (batch,), the log-odds that the image is REAL, exactly the PyTorch model's
output, and ``p_fake`` (batch,) = 1 - sigmoid(logit). A run trained with flip test-time
augmentation (``--tta flip``) is exported with it: the graph averages the logits of each
image and its mirror image, as predict does. Exported with ``torch.onnx.export``
(its dynamo exporter: needs the ``export`` extra, ``pip install -e ".[export]"``). When
onnxruntime is installed the command runs the exported file on a few images and reports
its largest difference from PyTorch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.errors import UserError, run_cli
from core.atomic import atomic_write_bytes
from core.flags import ArgumentParser
from core.rundir import read_json
from core.tensors import FORMAT
from .pipeline import to_input
from .predict import load_run

PROG = "python -m torch_cnn.export"
OPSET = 18  # every op these CNNs use exists there, and onnxruntime has run it since 1.14


class WithPreprocessing(torch.nn.Module):
    """uint8 NHWC images -> (logit, p_fake): the model plus the scaling the detector does
    before it, so the exported graph is the whole detector."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        logit = self.model(to_input(images)).reshape(-1)
        return logit, torch.sigmoid(-logit)


def export_onnx(model: torch.nn.Module, model_name: str, tta: str = "none") -> bytes:
    """The ONNX file (bytes) of an eval-mode CNN, batch dimension dynamic."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs it; a clear message beats its ImportError)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"ONNX export needs the 'export' extra: pip install -e \".[export]\" "
                        f"({e.name} is missing)") from None
    wrapped = WithPreprocessing(model.eval()).eval()
    example = torch.zeros((2, 32, 32, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=2**20)
    with torch.inference_mode():
        program = torch.onnx.export(
            wrapped, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
            output_names=["logit", "p_fake"], dynamic_shapes={"images": {0: batch}},
            external_data=False, verbose=False)
    proto = program.model_proto
    meta = {"format": FORMAT, "family": "cnn", "model": model_name, "tta": tta,
            "input": "images: uint8 (batch, 32, 32, 3) RGB",
            "outputs": "logit: log-odds REAL; p_fake: 1 - sigmoid(logit)"}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString()


def onnx_logits(path: str | Path, images_u8: np.ndarray) -> np.ndarray:
    """The exported file's ``logit`` output under onnxruntime (CPU)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logit"], {"images": np.ascontiguousarray(images_u8, np.uint8)})[0]


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog=PROG, description="Write a CNN run as an ONNX model.",
                        epilog=f"example:\n  {PROG} --run runs/detector --out detector.onnx")
    ap.add_argument("--run", required=True, help="run directory (config.json + model.safetensors)")
    ap.add_argument("--out", help="ONNX file to write (default: RUN_DIR/model.onnx)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "model.onnx"
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: name the file *.onnx")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    model = load_run(run)
    cfg = read_json(run / "config.json")  # load_run checked its model and tta
    atomic_write_bytes(out, export_onnx(model, cfg["model"], cfg.get("tta", "none")))
    print(f"wrote {out} ({out.stat().st_size:,} bytes): input 'images' uint8 (batch, 32, 32, 3), "
          f"outputs 'logit' (log-odds REAL) and 'p_fake'")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: the file was not run (pip install onnxruntime)")
        return 0
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        want = model(to_input(torch.from_numpy(imgs))).reshape(-1).double().numpy()
    diff = float(np.max(np.abs(onnx_logits(out, imgs).astype(np.float64) - want)))
    print(f"checked with onnxruntime on 8 random images: max |logit - PyTorch's| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="torch_cnn.export")
