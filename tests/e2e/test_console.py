"""The console commands of [project.scripts]: each resolves, runs the same main as its
``python -m`` form, has --version, and a --help with defaults and an example. Run
in-process through the entry functions (the checkout may not be the pip-installed one)."""
from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, synthetic_image
from tests.helpers import SCRIPTS, call, mlp_run

# commands whose --help needs only the core dependencies
CORE = {"cifake-train", "cifake-predict", "cifake-bench", "cifake-reproduce", "cifake-prepare",
        "cifake-demo"}


def test_the_commands_of_the_readme_are_declared():
    assert CORE | {"cifake-export", "cifake-demo"} <= set(SCRIPTS)
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("name", sorted(CORE))
def test_version_and_help_with_defaults_and_an_example(name, monkeypatch, capsys):
    code, out, _ = call(name, ["--version"], monkeypatch, capsys)
    assert code == 0 and out.strip(), out
    code, out, _ = call(name, ["--help"], monkeypatch, capsys)
    assert code == 0 and "example:" in out, out
    if name != "cifake-train":  # its one flag, --stack, has no default; the stack's help has
        assert "default" in out, out


def test_train_dispatch(monkeypatch, capsys):
    code, _, err = call("cifake-train", ["--epochs", "1"], monkeypatch, capsys)
    assert code == 2 and err.strip() == \
        "error: cifake-train: --stack is required: numpy, torch, jax (cifake-train --help)"
    code, _, err = call("cifake-train", ["--stack", "tensorflow"], monkeypatch, capsys)
    assert code == 2 and "tensorflow" in err and len(err.strip().splitlines()) == 1
    # --help after --stack is the stack's own, defaults and example included
    code, out, _ = call("cifake-train", ["--stack", "numpy", "--help"], monkeypatch, capsys)
    assert code == 0 and "numpy_mlp.train" in out and "--decay" in out and "example:" in out
    assert "(default: " in out


def test_predict_is_the_stacks_predict(tmp_path, monkeypatch, capsys):
    run_dir = mlp_run(tmp_path / "run")
    img = tmp_path / "a.png"
    Image.fromarray(synthetic_image(1, 0)).save(img)
    from data.errors import run_cli
    from numpy_mlp import predict
    with pytest.raises(SystemExit):
        run_cli(predict.main, ["--run", str(run_dir), str(img), "--json"])
    want = json.loads(capsys.readouterr().out)
    # no --stack: the run's own (config.json's "stack")
    code, out, _ = call("cifake-predict", ["--run", str(run_dir), str(img), "--json"],
                        monkeypatch, capsys)
    assert code == 0 and json.loads(out) == want
    code, _, err = call("cifake-predict", [str(img)], monkeypatch, capsys)
    assert code == 2 and "--run RUN_DIR is required" in err
    code, _, err = call("cifake-predict", ["--run", str(tmp_path / "nope"), str(img)],
                        monkeypatch, capsys)
    assert code == 2 and "nope" in err
    if importlib.util.find_spec("jax") is not None:
        code, out, _ = call("cifake-predict", ["--stack", "jax", "--run", str(run_dir),
                                               str(img), "--json"], monkeypatch, capsys)
        assert code == 0
        assert np.isclose(json.loads(out)[0]["p_fake"], want[0]["p_fake"], atol=1e-5)
