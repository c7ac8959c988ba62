"""The house's import rule, drawn in the README: data <- core <- the three stacks <- bench
and the user-facing commands. data/ is the CIFAKE dataset alone and imports no other
package of the project; core/ imports data/ only; no stack imports another stack."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("data", "core", "numpy_mlp", "torch_cnn", "jax_port", "bench", "cifake")
ALLOWED = {
    "data": set(),
    "core": {"data"},
    "numpy_mlp": {"data", "core"},
    "torch_cnn": {"data", "core"},
    "jax_port": {"data", "core"},
    "bench": {"data", "core", "numpy_mlp", "torch_cnn", "jax_port"},
    "cifake": {"data", "core", "numpy_mlp", "torch_cnn", "jax_port", "bench"},
}


def imported_packages(path: Path) -> set[str]:
    """The project's packages that ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & set(PACKAGES)
    # importlib.import_module("pkg.mod") counts too
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            found |= {node.args[0].value.split(".")[0]} & set(PACKAGES)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_layers(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        extra = imported_packages(path) - ALLOWED[package] - {package}
        if extra:
            bad.append(f"{path.relative_to(REPO)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_violation(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from torch_cnn.model import X\n")
    assert imported_packages(f) == {"torch_cnn"}
