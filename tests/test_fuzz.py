"""schemathesis against a real server, from its OpenAPI schema: no 500s, every answer as
documented (errors JSON in the documented shape), stateful sequences included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Server

pytestmark = pytest.mark.slow

CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "response_headers_conformance",
])  # fmt: skip


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(server: Server) -> None:
    schemathesis = str(Path(sys.executable).parent / "schemathesis")  # the venv's
    done = subprocess.run(
        [schemathesis, "run", server.url + "/openapi.json", "--max-examples", "40",
         "--checks", CHECKS, "--generation-deterministic"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    assert "generated" in done.stdout and " passed" in done.stdout
