"""Bearer-token authentication: tokens from a file, compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

from softserve.errors import InputError


def load_tokens(path: Path) -> tuple[bytes, ...]:
    """Non-empty, non-comment lines of a token file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read --token-file {path} ({exc.strerror})") from None
    tokens = tuple(
        line.strip().encode() for line in lines if line.strip() and not line.startswith("#")
    )
    if not tokens:
        raise InputError(f"--token-file {path} holds no token; write one token per line")
    return tokens


def authorized(header: str | None, tokens: tuple[bytes, ...]) -> bool:
    """Whether an Authorization header carries one of ``tokens``."""
    if header is None:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    candidate = presented.strip().encode()
    # compare against every token so timing says nothing about which (or whether) matched
    matches = [hmac.compare_digest(candidate, token) for token in tokens]
    return any(matches)
