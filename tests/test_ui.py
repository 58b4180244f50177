"""The view PNG route over HTTP, and /ui end to end in headless Chromium against a real
server: listing, browsing with the keyboard, an unknown set, a token-protected server.
Screenshots go to tests/artifacts/."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ARTIFACTS, Server
from PIL import Image

from softserve.pixels import apply_views
from softserve.storage.reader import LabelSetReader

TOKEN = "ui-test-token-0123456789"


def stored_view(root: Path, epoch: int, sample: int) -> tuple[np.ndarray, int]:
    """The view (uint8 H×W×C) of a sample in a stored epoch and the teacher's top class."""
    with LabelSetReader(root) as reader:
        rows = reader.read(epoch, 0, reader.config.num_samples, ["order", "params", "logits"])
        row = int(np.flatnonzero(rows["order"] == sample)[0])
        image = torch.from_numpy(reader.images(sample, sample + 1))
        params = torch.from_numpy(rows["params"][row : row + 1].astype(np.int64))
        view = apply_views(image, params, reader.config.views.output_size)[0]
        pixels = view.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return pixels, int(rows["logits"][row].argmax())


def test_view_png_is_the_stored_view(server: Server, store: Path) -> None:
    response = httpx.get(f"{server.url}/v1/labelsets/tiny/views/1/7.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    expected, _ = stored_view(store / "tiny", 1, 7)
    np.testing.assert_array_equal(shown, expected)
    wrapped = httpx.get(f"{server.url}/v1/labelsets/tiny/views/5/7.png")  # 4 stored: 5 is 1
    assert wrapped.content == response.content
    spec = httpx.get(server.url + "/openapi.json").json()
    route = spec["paths"]["/v1/labelsets/{name}/views/{epoch}/{sample}.png"]["get"]
    assert "image/png" in route["responses"]["200"]["content"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/labelsets/tiny/views/0/50.png", 404, "unknown_sample"),
        ("/v1/labelsets/nope/views/0/0.png", 404, "unknown_label_set"),
        ("/v1/labelsets/tiny/views/0/-1.png", 422, "invalid_request"),
    ],
)
def test_view_png_errors(server: Server, path: str, status: int, code: str) -> None:
    response = httpx.get(server.url + path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def _view_loaded(page, sample: int | None = None) -> None:
    """Wait until the view image shows (a decoded PNG) for ``sample``, if given."""
    expected = "true" if sample is None else f"img.dataset.sample === '{sample}'"
    page.wait_for_function(
        f"() => {{ const img = document.getElementById('view');"
        f" return img.complete && img.naturalWidth > 0 && {expected}; }}"
    )


@pytest.mark.slow
def test_ui_lists_sets_and_browses_views_by_keyboard(
    server: Server, store: Path, browser_page
) -> None:
    page = browser_page
    page.goto(server.url + "/ui")
    page.wait_for_selector("#set-rows tr")
    assert page.locator("#set-rows a").all_inner_texts() == ["tiny", "tiny-int8"]
    _shot(page, "ui-list")

    page.click("text=tiny >> nth=0")
    _view_loaded(page)
    box = page.locator("#view").bounding_box()
    assert box is not None and box["width"] > 0 and box["height"] > 0
    first = {
        "sample": int(page.get_attribute("#view", "data-sample")),
        "src": page.get_attribute("#view", "src"),
        "pixels": page.locator("#view").screenshot(),
        "chart": page.inner_html("#chart"),
    }
    epoch = int(page.get_attribute("#view", "data-epoch"))
    _, teacher = stored_view(store / "tiny", epoch, first["sample"])
    assert page.locator("#facts dd").nth(1).inner_text() == ["ant", "bee", "cat"][teacher]
    assert page.locator("#chart rect").count() == 3  # every class of three
    _shot(page, "ui-view")

    page.keyboard.press("ArrowRight")
    _view_loaded(page, first["sample"] + 1)
    assert page.get_attribute("#view", "src") != first["src"]
    assert page.locator("#view").screenshot() != first["pixels"]
    assert page.inner_html("#chart") != first["chart"]

    page.keyboard.press("ArrowUp")  # next epoch, same sample
    page.wait_for_function(f"() => document.getElementById('view').dataset.epoch === '{epoch + 1}'")
    assert "epoch=1" in page.url
    _shot(page, "ui-view-next")


@pytest.mark.slow
def test_ui_names_an_unknown_set(server: Server, browser_page) -> None:
    page = browser_page
    page.goto(server.url + "/ui?set=nope")
    message = page.locator("#message")
    message.wait_for()
    page.wait_for_function(
        "() => document.getElementById('message').textContent.includes('nope')"
    )
    assert 'Unknown label set "nope"' in message.inner_text()
    assert page.locator("#browser").is_hidden()
    _shot(page, "ui-unknown-set")


@pytest.mark.slow
def test_ui_needs_a_valid_token(store: Path, tmp_path: Path, browser_page) -> None:
    page = browser_page
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    server = Server(store, "--token-file", tokens).start()
    try:
        assert httpx.get(f"{server.url}/v1/labelsets/tiny/views/0/0.png").status_code == 401
        page.goto(server.url + "/ui?set=tiny")
        page.wait_for_selector("#token-form", state="visible")
        assert "needs a bearer token" in page.inner_text("#message")
        assert page.locator("#browser").is_hidden()

        page.fill("#token", "wrong-token-wrong-token")
        page.click("#token-form button")
        page.wait_for_function(
            "() => document.getElementById('message').textContent.includes('rejected')"
        )
        assert page.locator("#browser").is_hidden()
        _shot(page, "ui-token-rejected")

        page.fill("#token", TOKEN)
        page.click("#token-form button")
        _view_loaded(page)
        assert page.locator("#token-form").is_hidden()
    finally:
        server.stop()
