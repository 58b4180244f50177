"""Bearer-token authentication: tokens from a file, compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

from softserve.errors import InputError

#: Shorter tokens are refused: guessable by brute force over a fast API.
MIN_TOKEN_LENGTH = 16


def load_tokens(path: Path) -> tuple[bytes, ...]:
    """The tokens of a token file: one per line, surrounding whitespace stripped; blank
    lines and lines whose first non-blank character is ``#`` are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read --token-file {path} ({exc.strerror})") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise InputError(
                f"--token-file {path} line {number}: a token is one word of at least "
                f"{MIN_TOKEN_LENGTH} characters (e.g. from 'openssl rand -hex 32')"
            )
        tokens.append(token.encode())
    if not tokens:
        raise InputError(f"--token-file {path} holds no token; write one token per line")
    return tuple(tokens)


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
