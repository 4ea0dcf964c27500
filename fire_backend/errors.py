"""The one exception base of the project.

Every failure FIRE expects (a missing or corrupt file, a model it cannot protect, a server that will
not start, a refused request) raises a ``FireError`` subclass whose message says what went wrong and
what to do. The ``fire`` command catches ``FireError`` once and prints ``fire <command>: <message>``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FireError(Exception):
    """An expected failure; the message is one line a user can act on."""


class InvalidInputError(FireError, ValueError):
    """A value, file or request the step cannot use (the message says which and why)."""


class MissingFileError(FireError, FileNotFoundError):
    """A file or directory the step needs is not there (the message says which, and what writes it)."""


class StepFailedError(FireError, RuntimeError):
    """An outside tool or server the step drives failed (the message carries its reason)."""
