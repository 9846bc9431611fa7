"""The arrows of docs/development.md, read from the source: which module may import which."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_dpgan"


def imported(path: Path) -> set[str]:
    """Every lightning_dpgan module a file imports, at any depth of the file (lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_dpgan"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("lightning_dpgan"))
    return names


@pytest.mark.parametrize(
    "files,forbidden",
    [
        (["fabric.py"], "lightning_dpgan.strategy"),  # the two strategies share gossip_strategy and processes
        (["strategy.py"], "lightning_dpgan.fabric"),
        (["metrics/*.py"], "lightning_dpgan.replicas"),  # a metric reads its weights through loading, not checkpoints
        (["loading.py", "processes.py"], "lightning_dpgan.strategy"),
    ],
)
def test_modules_import_only_along_the_arrows(files, forbidden):
    for pattern in files:
        for path in PACKAGE.glob(pattern):
            found = sorted(name for name in imported(path) if name == forbidden or name.startswith(forbidden + "."))
            assert not found, f"{path.relative_to(PACKAGE)} imports {found}"


def test_the_check_can_see_an_import():
    """The walker finds a lazy import inside a function, so the test above can fail."""
    assert "lightning_dpgan.replicas.read_main" in imported(PACKAGE / "command" / "verbs.py")
