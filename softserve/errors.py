"""The one exception family softserve raises for problems a user can fix."""

from __future__ import annotations


class SoftserveError(Exception):
    """A problem with the user's input or environment, with a one-line message and a fix.

    The CLI prints ``error: <message>`` and exits non-zero; nothing else is printed, since
    the message already names the problem and what to do about it.
    """


class InputError(SoftserveError):
    """Images, teacher, weights or options that cannot be used."""


class StoreError(SoftserveError):
    """A label set on disk that is missing, incomplete, corrupt, or a different one."""


def brief(exc: BaseException, limit: int = 200) -> str:
    """One line about a third-party exception, for embedding in a SoftserveError message."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
