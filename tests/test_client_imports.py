"""The client package stays light: no h5py, no server stack."""

from __future__ import annotations

import subprocess
import sys

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
