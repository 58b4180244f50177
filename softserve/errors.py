"""The one exception family softserve raises for problems a user can fix.

Every package's errors are here but the HTTP API's (``service/errors.py``), which are
SoftserveErrors too. Torch-free: the server and the client share this module.
"""

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


class StoreChanged(StoreError):
    """A file changed or was replaced while its set was being opened: open it again."""


class PayloadError(SoftserveError, ValueError):
    """A payload or stream that cannot be decoded, or an error the server sent in-stream."""

    def __init__(self, message: str, from_server: bool = False) -> None:
        super().__init__(message)
        self.from_server = from_server


class GoingAway(PayloadError):
    """The server ended the stream because it is shutting down: resume, here or elsewhere."""


class ClientError(SoftserveError):
    """The server refused a request (4xx), or could not be reached after every retry."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ServerError(SoftserveError):
    """A 5xx answer: worth a retry, on this server or another (after ``retry_after``
    seconds, when the server said so)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Interrupted(SoftserveError):
    """Ctrl-C or SIGTERM in a command that says what it kept; the CLI prints it."""


def first_invalid(exc: Exception) -> str:
    """The first problem a pydantic ValidationError reports, as ``field.path: message``
    (the message alone for the whole value), for a one-line error."""
    error = exc.errors()[0]  # type: ignore[attr-defined]
    where = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def brief(exc: BaseException, limit: int = 200) -> str:
    """One line about a third-party exception, for embedding in a SoftserveError message."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
