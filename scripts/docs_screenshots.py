"""Take the README's screenshots of a label set's report and of /ui, with Playwright and
Debian's chromium: ``python scripts/docs_screenshots.py STORE/NAME [--out docs]``.

It writes the report into a temporary folder, serves the store on a free loopback port,
and saves ``report.png`` and ``ui.png``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("label_set", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--sample", type=int, default=0)
    args = parser.parse_args()
    softserve = [sys.executable, "-m", "softserve"]
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report"
        subprocess.run([*softserve, "report", str(args.label_set), "--out", str(report),
                        "--no-progress"], check=True)  # fmt: skip
        server = subprocess.Popen([*softserve, "serve", "--store", str(args.label_set.parent),
                                   "--port", str(port)])  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
                page = browser.new_page(viewport={"width": 1100, "height": 1400})
                page.goto((report / "report.html").as_uri())
                page.screenshot(path=args.out / "report.png")
                page = browser.new_page(viewport={"width": 1000, "height": 560})
                page.goto(f"{url}/ui?set={args.label_set.name}&sample={args.sample}")
                page.wait_for_function(
                    "() => document.getElementById('view').naturalWidth > 0"
                )
                page.screenshot(path=args.out / "ui.png")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
