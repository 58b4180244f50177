"""CLI and server start-up polish: version, help texts, one-line errors, timestamped logs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import socket
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import Server, free_port, run_cli, start_cli
from test_errors import assert_one_line_error

from softserve.service.settings import ServiceSettings

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"softserve {importlib.metadata.version('softserve')}"


def test_help_texts_keep_what_they_say() -> None:
    """Markdown help keeps `<OPTION>` and shows ratios as written, not as 1.3333333333333333."""
    serve = run_cli("serve", "--help")
    assert serve.returncode == 0, serve.stderr
    assert "SOFTSERVE_<OPTION>" in serve.stdout
    relabel = run_cli("relabel", "--help")
    assert "[default: 4/3]" in relabel.stdout and "1.333" not in relabel.stdout


def test_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = run_cli("serve", "--store", tmp_path, "--port", port, timeout=60)
    assert_one_line_error(done, f"port {port} on 127.0.0.1 is in use", "--port")


@pytest.mark.parametrize(
    ("flags", "env"), [(["--log-level", "bogus"], {}), ([], {"SOFTSERVE_LOG_LEVEL": "bogus"})]
)
def test_a_bad_log_level_is_one_line(tmp_path: Path, flags: list, env: dict) -> None:
    done = run_cli("serve", "--store", tmp_path, *flags, env=env, timeout=60)
    assert_one_line_error(done, "log_level", "SOFTSERVE_LOG_LEVEL", "'debug'")


def test_log_levels_are_case_insensitive() -> None:
    assert ServiceSettings(log_level="DEBUG").log_level == "debug"
    assert ServiceSettings(log_level="Trace").log_level == "trace"


@pytest.mark.parametrize(
    ("flags", "env", "fragment"),
    [
        (["--port", "70000"], {}, "port"),
        ([], {"SOFTSERVE_WORKERS": "0"}, "SOFTSERVE_WORKERS"),
    ],
)
def test_demo_run_checks_server_settings_before_preparing(
    tmp_path: Path, flags: list, env: dict, fragment: str
) -> None:
    """A bad port or SOFTSERVE_* setting fails at once, not after minutes of preparation
    (here the preparation would fail on the missing data instead)."""
    done = run_cli(
        "demo", "run", "--workdir", tmp_path / "demo", "--store", tmp_path / "store",
        "--data", tmp_path / "no-data", *flags, env=env, timeout=60,
    )  # fmt: skip
    assert_one_line_error(done, "bad server setting", fragment)
    assert not (tmp_path / "demo").exists()


def test_demo_prepare_refuses_unknown_views_before_any_work(tmp_path: Path) -> None:
    done = run_cli(
        "demo", "prepare", "--workdir", tmp_path / "demo", "--store", tmp_path / "store",
        "--views", "autoaugment", timeout=60,
    )  # fmt: skip
    assert_one_line_error(done, "unknown views 'autoaugment'", "rrc, dsa")
    assert not (tmp_path / "demo").exists() and not (tmp_path / "store").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_is_one_line_and_exit_130(sig: int) -> None:
    """Ctrl-C or SIGTERM in any command: here report, blocked waiting for a server that
    accepted its request and never answers; the signal comes once the request has arrived."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(120)
        port = silent.getsockname()[1]
        proc = start_cli("report", "--url", f"http://127.0.0.1:{port}", "--labelset", "x",
                         "--no-progress")  # fmt: skip
        conn, _ = silent.accept()
        with conn:
            conn.settimeout(120)
            assert conn.recv(1)  # the request is on its way: the command waits for an answer
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr


def test_a_manifest_that_is_a_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO in the manifest's place would block a reader (and every rescan) forever."""
    (tmp_path / "set").mkdir()
    os.mkfifo(tmp_path / "set" / "manifest.json")
    done = run_cli("inspect", tmp_path / "set", timeout=60)
    assert_one_line_error(done, "is a pipe, socket or device; it must be a plain file")


@pytest.mark.parametrize("flag", [["--labelset", "other"], ["--token", "secret"]])
def test_report_on_a_directory_refuses_server_options(tmp_path: Path, flag: list[str]) -> None:
    done = run_cli("report", tmp_path / "set", *flag, "--no-progress")
    assert_one_line_error(done, "--labelset and --token are for a served set (--url URL)")


def test_report_on_a_directory_ignores_softserve_token(tmp_path: Path) -> None:
    """SOFTSERVE_TOKEN left in the environment is not a --token given by mistake."""
    done = run_cli("report", tmp_path / "nowhere", "--no-progress", env={"SOFTSERVE_TOKEN": "t"})
    assert done.returncode == 1 and "nowhere" in done.stderr and "--token" not in done.stderr


def test_inspect_tells_no_such_path_from_not_a_label_set(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for json_flag in ([], ["--json"]):
        for path, fragment in [
            ("nowhere", "no such file or folder"),
            ("folder", "is not a label set"),
            ("file.txt", "is a file"),
        ]:
            assert_one_line_error(run_cli("inspect", tmp_path / path, *json_flag), fragment)


def test_unknown_label_set_names_the_available_ones(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/labelsets/tinny")
    assert response.status_code == 404
    assert response.json()["error"]["message"].endswith("available: tiny, tiny-int8")


def test_logs_have_iso_timestamps_and_the_access_log_is_json(tmp_path: Path) -> None:
    """Every text line starts with an ISO 8601 time, every access line is a JSON object with
    one; an empty store is warned about at start and named in a 404."""
    (tmp_path / "store").mkdir()
    srv = Server(tmp_path / "store", port=free_port()).start()
    try:
        missing = httpx.get(f"{srv.url}/v1/labelsets/x").json()["error"]["message"]
        assert "has no label sets" in missing
        httpx.get(f"{srv.url}/healthz")
    finally:
        srv.stop()
    lines = [line for line in srv.log.read_text().splitlines() if line.strip()]
    access = [json.loads(line) for line in lines if line.startswith("{")]
    text = [line for line in lines if not line.startswith("{")]
    assert {a["path"] for a in access} >= {"/v1/labelsets/x", "/healthz"}
    for entry in access:
        assert ISO.match(entry["time"]), entry
        datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
    assert text and all(ISO.match(line) for line in text), text
    assert any("WARNING" in line and "holds no label sets" in line for line in text), text
