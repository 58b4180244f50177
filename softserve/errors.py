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
