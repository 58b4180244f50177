"""Installs by role: the client works with the base install alone, the server runs with its
extra and no torch, and a command whose packages are missing names the extra to install.

Each runs in a real venv that holds only the chosen extras' requirements (from softserve's
installed metadata, linked from this environment: :mod:`lean_env`).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import Server, cli_env
from lean_env import closure, lean_venv

BATCH = "/v1/labelsets/{}/epochs/1/batches/0?batch_size=8&include=indices,hard,soft,logits"


def run_lean(python: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` from a folder outside the source tree."""
    return subprocess.run(
        [str(python), *map(str, args)], env=cli_env(), capture_output=True, text=True,
        timeout=120, cwd=python.parent,
    )  # fmt: skip


def test_roles_install_what_they_need() -> None:
    """The base install is the client's set; the server's extra brings no vision stack."""
    base = closure(set())
    for needed in ("torch", "numpy", "httpx", "tenacity", "pydantic"):
        assert needed in base
    assert "safetensors" not in base  # only the tests use the reference reader
    for server_side in ("h5py", "fastapi", "uvicorn", "typer", "rich", "prometheus-client"):
        assert server_side not in base
    assert closure({"client"}) == base
    server = closure({"server"})
    assert {"fastapi", "uvicorn", "h5py", "prometheus-client"} <= server
    assert not {"torchvision", "pillow"} & server
    assert {"torchvision", "h5py", "pillow"} <= closure({"worker"})
    assert closure({"worker"}) | {"matplotlib"} <= closure({"report"})
    assert closure({"all"}) == closure({"server"}) | closure({"report"})


def test_client_runs_on_the_base_install(server: Server, tmp_path: Path) -> None:
    """`import softserve.client` and a real epoch from a real server, in a venv without
    h5py, fastapi, uvicorn, typer, rich and prometheus-client."""
    python = lean_venv(tmp_path / "venv", set())
    for module in ("h5py", "fastapi", "uvicorn", "typer", "rich", "prometheus_client"):
        assert "ModuleNotFoundError" in run_lean(python, "-c", f"import {module}").stderr
    code = (
        "import sys, torch\n"
        "import softserve.client as client\n"
        "remote = client.Client(sys.argv[1]).labelset('tiny-int8')\n"
        "batches = list(remote.loader(4, epochs=1, logits=True))\n"
        "loss = client.get_loss('gift')(torch.randn(4, 3), batches[0])\n"
        "print(len(batches), batches[0].soft.shape[1], bool(torch.isfinite(loss)))\n"
    )
    done = run_lean(python, "-c", code, server.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "3", "True"]


def test_server_runs_without_torch(server: Server, store: Path, tmp_path: Path) -> None:
    """The server's extra without torch (as the server image installs it): it serves decoded
    labels and recovered logits (NumPy decoding), byte for byte what the full install does."""
    python = lean_venv(tmp_path / "venv", {"server"}, without=("torch",))
    assert "ModuleNotFoundError" in run_lean(python, "-c", "import torch").stderr
    lean = Server(store, command=[str(python), "-m", "softserve"])
    lean.start()
    try:
        for name in ("tiny", "tiny-int8"):
            got = httpx.get(lean.url + BATCH.format(name), timeout=30)
            assert got.status_code == 200, got.text
            assert got.content == httpx.get(server.url + BATCH.format(name)).content
        view = httpx.get(lean.url + "/v1/labelsets/tiny/views/0/0.png", timeout=30)
        assert view.status_code == 501 and view.json()["error"]["code"] == "views_unavailable"
    finally:
        lean.stop()


def test_a_running_server_has_not_loaded_torch(store: Path) -> None:
    """The full install's server process, after serving labels and logits, maps no torch
    library (and does map h5py's, so the check sees extension modules). A server of its own:
    the session's server may have drawn a view, the one route that loads torch."""
    fresh = Server(store).start()
    try:
        assert httpx.get(fresh.url + BATCH.format("tiny-int8")).status_code == 200
        assert fresh.proc is not None
        maps = Path(f"/proc/{fresh.proc.pid}/maps").read_text()
    finally:
        fresh.stop()
    assert "/h5py" in maps
    assert "/torch/" not in maps


@pytest.mark.parametrize(
    ("extras", "args", "fragments"),
    [
        (set(), ["serve", "--store", "nowhere"], ("'softserve serve' needs typer", "[server]")),
        (set(), ["--help"], ("softserve command needs typer", "[server]", "[worker]")),
        (
            {"server"},
            ["relabel", "--images", "x", "--teacher", "y", "--out", "z"],
            ("'softserve relabel' needs", "softserve[worker]"),
        ),
    ],
)
def test_a_missing_extra_is_named(
    extras: set[str], args: list[str], fragments: tuple, tmp_path: Path
) -> None:
    done = run_lean(lean_venv(tmp_path / "venv", extras), "-m", "softserve", *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_wheel_ships_type_hints_and_the_public_api(tmp_path: Path) -> None:
    """A built wheel carries py.typed (PEP 561); ``__all__`` is every lazily loaded name, each
    resolves, and the imports type checkers read name exactly the same set."""
    root = Path(__file__).parent.parent
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    for folder in ("softserve", "storage", "worker", "service", "clients"):
        shutil.copytree(root / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__py*"))
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")], cwd=tmp_path,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"softserve/py.typed", "softserve/client/py.typed"} <= names

    import softserve.client as client

    assert set(client.__all__) == set(client._EXPORTS)
    resolved = {name: getattr(client, name) for name in client.__all__}  # each one loads
    assert resolved["open_local"].__module__ == "softserve.client.local"
    tree = ast.parse((root / "clients" / "python" / "__init__.py").read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If))  # the TYPE_CHECKING block
    static = {a.asname or a.name for n in guarded.body for a in n.names}
    assert static == set(client.__all__)
    assert {"open_local", "LocalLabelSet", "LabelSet", "RemoteLabelSet", "Loader"} <= static
