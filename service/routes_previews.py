"""The view route: one sample's view in one epoch as a PNG, for people looking at a set."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from softserve.service.errors import openapi_errors
from softserve.service.previews import view_png
from softserve.service.requests import Entry, require_token

router = APIRouter(dependencies=[Depends(require_token)])


@router.get(
    "/v1/labelsets/{name}/views/{epoch}/{sample}.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the view"},
        **openapi_errors(409, 501, 503),
    },
)
async def get_view(
    entry: Entry,
    epoch: Annotated[int, Path(ge=0, description="Epoch; wraps modulo the stored epochs")],
    sample: Annotated[int, Path(ge=0, description="Sample id")],
) -> Response:
    """The view a sample was seen through in an epoch, as the teacher saw it (crop, resize
    and flip, or the DSA views, by the stored parameters, and a mixed set's stored
    CutMix/Mixup with its partner's view; before normalization, DSA's clipped to [0, 1]),
    as a PNG."""
    body = await run_in_threadpool(view_png, entry, epoch, sample)
    return Response(body, media_type="image/png", headers={"X-Softserve-Digest": entry.digest})
