"""The client package stays light: no h5py, no server stack."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

FORBIDDEN = ("h5py", "fastapi", "uvicorn", "softserve.service", "softserve.storage")


def test_client_import_is_light() -> None:
    """`import softserve.client` in a fresh interpreter loads none of the server-side modules."""
    code = (
        "import sys\n"
        "import softserve.client\n"
        f"loaded = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert 'softserve.client.losses' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_wheel_ships_type_hints_and_the_public_api(tmp_path: Path) -> None:
    """A built wheel carries py.typed (PEP 561); ``__all__`` names exactly what is public."""
    root = Path(__file__).parent.parent
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    for folder in ("softserve", "storage", "worker", "service", "clients"):
        shutil.copytree(root / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__py*"))
    code = (
        "import sys; from setuptools import build_meta as b; "
        "print(b.build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")], cwd=tmp_path,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"softserve/py.typed", "softserve/client/py.typed"} <= names

    import softserve.client as client

    exported = {n for n, v in vars(client).items() if not n.startswith("_")}
    assert {n for n in exported if not inspect.ismodule(getattr(client, n))} == set(
        client.__all__
    )
    assert {"open_local", "LocalLabelSet", "LabelSet", "RemoteLabelSet", "Loader"} <= set(
        client.__all__
    )
