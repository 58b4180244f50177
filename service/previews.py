"""One view of one sample as a PNG: what the teacher saw, for people looking at a label set.

The view is built by :func:`softserve.pixels.stored_views` from the stored crop and
flip or DSA row (and, in a mixed set, the stored mix and the partner's view) with
``mixed_views``, the
function the worker and training use. It needs torch and Pillow, imported on the first
request for a view, never when the server starts; a server installed without torch (the
server image) answers 501 ``views_unavailable`` and serves everything else.
"""

from __future__ import annotations

import io

import numpy as np

from softserve.errors import StoreError
from softserve.service.catalog import CatalogEntry
from softserve.service.errors import ApiError


def _row_of(entry: CatalogEntry, stored_epoch: int, sample: int) -> dict[str, np.ndarray]:
    """How sample ``sample`` was seen in a stored epoch: its view parameters, and in a mixed
    set its mix row and its partner's view parameters (one row each)."""
    config = entry.manifest.config
    fields = ["params"] if config.mix is None else ["params", "mix", "partner_params"]
    try:
        with entry.lock:
            order = entry.reader.read(stored_epoch, 0, config.num_samples, ["order"])["order"]
            hits = np.flatnonzero(order == sample)
            if not len(hits):
                raise StoreError(
                    f"{entry.reader.root}: stored epoch {stored_epoch} never shows sample "
                    f"{sample} (its order is not a permutation); run 'softserve verify'"
                )
            position = int(hits[0])
            return entry.reader.read(stored_epoch, position, position + 1, fields)
    except StoreError as exc:
        entry.withdraw(str(exc))
        raise


def view_png(entry: CatalogEntry, epoch: int, sample: int) -> bytes:
    """PNG of sample ``sample``'s view in epoch ``epoch`` (wrapping modulo the stored
    epochs), at the label set's output size, 8-bit grey or RGB."""
    try:
        import torch
        from PIL import Image

        from softserve.pixels import stored_views
    except ModuleNotFoundError as exc:
        raise ApiError(
            501, "views_unavailable",
            f"rendering views needs {exc.name}, which this server was installed without: "
            "pip install 'softserve[worker]' beside 'softserve[server]'",
        ) from exc  # fmt: skip

    config = entry.manifest.config
    if not 0 <= sample < config.num_samples:
        raise ApiError(
            404, "unknown_sample", f"sample {sample} is outside 0..{config.num_samples - 1}"
        )
    row = _row_of(entry, epoch % config.epochs, sample)
    view = stored_views(
        None if config.mix is None else config.mix.kind, entry.base_images, np.array([sample]),
        row["params"], config.views.output_size, row.get("mix"), row.get("partner_params"),
        config.views.interpolation, views=config.views.policy, mean=config.mean, std=config.std,
    )[0]  # fmt: skip
    pixels = view.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
