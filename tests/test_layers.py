"""The house's floors, as the README's architecture draws them: what may import what."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Product folders and the package each maps to (pyproject's package-dir).
PACKAGES = {
    "softserve": ROOT / "softserve",
    "softserve.storage": ROOT / "storage",
    "softserve.worker": ROOT / "worker",
    "softserve.service": ROOT / "service",
    "softserve.client": ROOT / "clients" / "python",
}
#: Folders that must not import the client.
BELOW_CLIENT = [ROOT / "storage", ROOT / "service", ROOT / "softserve" / "format",
                ROOT / "softserve" / "pixels.py", ROOT / "softserve" / "errors.py"]  # fmt: skip
LONGEST_FUNCTION = 120


def sources(*places: Path) -> list[Path]:
    return sorted(f for p in places for f in ([p] if p.is_file() else p.rglob("*.py")))


def imported(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sources(*BELOW_CLIENT), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_below_the_client_imports_it(path: Path) -> None:
    assert not {m for m in imported(path) if m.split(".")[:2] == ["softserve", "client"]}


def test_the_format_kernel_imports_neither_torch_nor_h5py() -> None:
    """Every module of softserve.format, imported in a fresh interpreter, loads no torch and
    no h5py (the server's request path and the storage layer rely on it)."""
    modules = [f"softserve.format.{p.stem}" for p in (ROOT / "softserve" / "format").glob("*.py")]
    code = (
        "import importlib, sys\n"
        f"for m in {sorted(modules)!r}: importlib.import_module(m)\n"
        "print(sorted({'torch', 'h5py'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_product_function_is_over_120_lines() -> None:
    """Long functions hide several ideas; the limit the redesign set (issue 22)."""
    long = []
    for path in sources(*PACKAGES.values()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long
