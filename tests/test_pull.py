"""``softserve pull`` through a real server: a mirror byte for byte, resumed after a cut
with only the rest fetched, never half a set, refused clearly; and the file route it reads
(ranges, names, versions)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest
from conftest import Proxy, Server, run_cli

from softserve.client.pull import pull, staging_folder
from softserve.errors import ClientError, PayloadError, StoreError
from softserve.storage.layout import label_set_folders

FILES = "/v1/labelsets/tiny/files"
TOKEN = "pull-token-0123456789"


def set_files(root: Path) -> dict[str, bytes]:
    """Every file of a label set folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def listed(root: Path) -> dict[str, int]:
    """The sizes of the files a set's manifest lists, by name."""
    manifest = json.loads((root / "manifest.json").read_text())
    return {e["file"]: e["size"] for e in (manifest["dataset"], *manifest["shards"])}


def digest_of(root: Path) -> str:
    return hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()


def test_pull_mirrors_a_served_set_that_verifies_and_serves(
    server: Server, store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mirror" / "tiny"
    done = run_cli("pull", server.url, "--labelset", "tiny", "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"pulled tiny into {out}" in done.stdout and "4 files" in done.stdout
    assert set_files(out) == set_files(store / "tiny")
    served = httpx.get(server.url + "/v1/labelsets/tiny").json()["digest"]
    assert digest_of(out) == served
    assert not staging_folder(out).exists()
    assert run_cli("verify", out).returncode == 0
    again = run_cli("pull", server.url, "--labelset", "tiny", "--out", out, "--no-progress")
    assert again.returncode == 0 and "already up to date" in again.stdout
    with Server(out.parent) as mirror:
        assert httpx.get(mirror.url + "/v1/labelsets/tiny").json()["digest"] == served


def raw_status(port: int, path: str) -> int:
    """The status of a GET of ``path`` sent as is (no client normalizes its dots)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return int(s.makefile("rb").readline().split()[1])


def test_the_file_route_serves_ranges_of_listed_files_only(server: Server, store: Path) -> None:
    data = (store / "tiny" / "labels-00000.h5").read_bytes()
    size = len(data)
    whole = httpx.get(server.url + FILES + "/labels-00000.h5")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert whole.headers["x-softserve-digest"] == digest_of(store / "tiny")
    assert whole.headers["accept-ranges"] == "bytes"
    ranges = {"bytes=10-19": (10, 20), "bytes=100-": (100, size), "bytes=-7": (size - 7, size),
              f"bytes=0-{10 * size}": (0, size)}  # fmt: skip
    for asked, want in ranges.items():
        part = httpx.get(server.url + FILES + "/labels-00000.h5", headers={"Range": asked})
        assert part.status_code == 206 and part.content == data[slice(*want)], asked
        assert part.headers["content-range"] == f"bytes {want[0]}-{want[1] - 1}/{size}"
    for ignored in ("bytes=5-2", "items=0-1", "bytes=0-1,4-5", "bytes=-"):
        assert httpx.get(server.url + FILES + "/labels-00000.h5",
                         headers={"Range": ignored}).status_code == 200  # fmt: skip
    for past in (f"bytes={size}-", "bytes=-0", f"bytes={'9' * 5000}-"):
        refused = httpx.get(server.url + FILES + "/labels-00000.h5", headers={"Range": past})
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{size}"
        assert refused.json()["error"]["code"] == "range_not_satisfiable"
    manifest = httpx.get(server.url + FILES + "/manifest.json", headers={"Range": "bytes=0-0"})
    assert manifest.status_code == 206 and manifest.content == b"{"
    for name in ("relabel-plan.json", "manifest.json.tmp", "labels-00000.h5.tmp", "%2E%2E",
                 "..%2Fmanifest.json", "..%2F..%2Ftiny-int8%2Fmanifest.json"):  # fmt: skip
        assert httpx.get(server.url + FILES + "/" + name).status_code == 404, name
    assert raw_status(server.port, FILES + "/../../tiny-int8/files/manifest.json") == 404
    assert raw_status(server.port, FILES + "/../manifest.json") == 404
    other = httpx.get(server.url + FILES + "/dataset.h5", params={"digest": "0" * 64})
    assert other.status_code == 409 and other.json()["error"]["code"] == "digest_mismatch"


def test_a_server_with_tokens_requires_one(store: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    out = tmp_path / "mirror" / "tiny"
    with Server(store, "--token-file", tokens) as srv:
        assert httpx.get(srv.url + FILES + "/manifest.json").status_code == 401
        wrong = {"Authorization": "Bearer wrong-token-0123456789"}
        assert httpx.get(srv.url + FILES + "/dataset.h5", headers=wrong).status_code == 401
        refused = run_cli("pull", srv.url, "--labelset", "tiny", "--out", out, "--no-progress")
        assert refused.returncode == 1 and not out.exists()
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: 401") and "--token" in lines[0]
        assert pull(srv.url, "tiny", out, token=TOKEN).fetched_bytes == sum(listed(out).values())


def test_a_cut_pull_resumes_and_fetches_only_the_rest(
    server: Server, store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mirror" / "tiny"
    sizes = listed(store / "tiny")
    with Proxy(server.url, "labels-00000.h5", cut_after=3000) as proxy:
        with pytest.raises(ClientError, match="rerun the same command to resume"):
            pull(proxy.url, "tiny", out, retries=0)
        staged = staging_folder(out) / "tiny"
        assert (staged / "labels-00000.h5.tmp").stat().st_size == 3000
        assert not out.exists() and list(label_set_folders(out.parent)) == []
        first = proxy.file_bytes
        assert first == sizes["dataset.h5"] + 3000
        result = pull(proxy.url, "tiny", out)
    assert result.fetched_bytes == proxy.file_bytes - first == sum(sizes.values()) - first
    assert (FILES + "/labels-00000.h5", "bytes=3000-") in proxy.requests
    assert set_files(out) == set_files(store / "tiny")
    # a cut within one run is continued by that run: no byte fetched twice
    again = tmp_path / "again" / "tiny"
    with Proxy(server.url, "labels-00001.h5", cut_after=1000) as proxy:
        result = pull(proxy.url, "tiny", again)
    assert result.fetched_bytes == proxy.file_bytes == sum(sizes.values())
    assert (FILES + "/labels-00001.h5", "bytes=1000-") in proxy.requests
    assert set_files(again) == set_files(store / "tiny")


def test_a_flipped_byte_is_refused_and_the_file_deleted(
    server: Server, store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mirror" / "tiny"
    flipped = pytest.raises(PayloadError, match="labels-00001.h5 .* has sha256 .* deleted")
    with Proxy(server.url, "labels-00001.h5", flip_at=4000) as proxy, flipped:
        pull(proxy.url, "tiny", out)
    staged = staging_folder(out) / "tiny"
    assert not list(staged.glob("labels-00001.h5*")) and (staged / "labels-00000.h5").exists()
    assert not out.exists() and list(label_set_folders(out.parent)) == []
    result = pull(server.url, "tiny", out)
    assert result.fetched_bytes == listed(store / "tiny")["labels-00001.h5"]
    assert set_files(out) == set_files(store / "tiny")


def test_a_set_replaced_mid_pull_is_never_mixed(builds: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = builds
    served = tmp_path / "served"
    shutil.copytree(a, served / "set")
    out = tmp_path / "mirror" / "set"

    def replace() -> None:
        """Build b renamed into place, then the server's rescan waited for."""
        shutil.copytree(b, tmp_path / "b-copy")
        (served / "set").rename(tmp_path / "a-old")
        (tmp_path / "b-copy").rename(served / "set")
        deadline = time.monotonic() + 20
        while httpx.get(srv.url + "/v1/labelsets/set").json().get("digest") != digest_of(b):
            assert time.monotonic() < deadline, "the server never served build b"
            time.sleep(0.1)

    with Server(served) as srv, Proxy(srv.url, "labels-00000.h5", before=replace) as proxy:
        with pytest.raises(ClientError, match="replaced during the pull") as caught:
            pull(proxy.url, "set", out)
        assert caught.value.status == 409
        assert not out.exists() and list(label_set_folders(out.parent)) == []
        result = pull(proxy.url, "set", out)
    assert result.restarted and result.digest == digest_of(b) == digest_of(out)
    assert set_files(out) == set_files(b)


def test_an_out_that_holds_something_else_or_has_no_room_is_refused(
    server: Server, store: Path, tmp_path: Path, small_disk: Path
) -> None:
    other = tmp_path / "mirror" / "tiny"
    shutil.copytree(store / "tiny-int8", other)
    before = set_files(other)
    with pytest.raises(StoreError, match="holds another label set"):
        pull(server.url, "tiny", other)
    assert set_files(other) == before
    (tmp_path / "mirror" / "junk").mkdir()
    (tmp_path / "mirror" / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not a label set"):
        pull(server.url, "tiny", tmp_path / "mirror" / "junk")
    (small_disk / "filler").write_bytes(bytes(80 << 10))
    with pytest.raises(StoreError, match=r"MiB more, and .* MiB are free"):
        pull(server.url, "tiny", small_disk / "tiny")
    assert not (small_disk / "tiny").exists()


def test_a_disk_that_fills_mid_pull_is_one_line_and_a_rerun_resumes(
    server: Server, store: Path, small_disk: Path
) -> None:
    """Room (in 4 KiB pages) for every file but the last shard's last page: the free-space
    check passes, and the disk fills while the last shard is written."""
    sizes = listed(store / "tiny")
    pages = sum(-(-n // 4096) for n in sizes.values())  # the set's files, a page each at least
    (small_disk / "filler").write_bytes(bytes(shutil.disk_usage(small_disk).free - pages * 4096))
    out = small_disk / "tiny"
    with pytest.raises(StoreError, match="the disk is full; what was fetched is kept"):
        pull(server.url, "tiny", out)  # source.json takes the page the last shard lacks
    assert not out.exists()
    (small_disk / "filler").unlink()
    result = pull(server.url, "tiny", out)
    assert 0 < result.fetched_bytes <= sizes["labels-00001.h5"]
    assert set_files(out) == set_files(store / "tiny")
