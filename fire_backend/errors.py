"""The one exception base of the project.

Every failure FIRE expects (a missing or corrupt file, a model it cannot protect, a server that will
not start, a refused request) raises a ``FireError`` subclass whose message says what went wrong and
what to do. The ``fire`` command catches ``FireError`` once and prints ``fire <command>: <message>``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FireError(Exception):
    """An expected failure; the message is one line a user can act on."""
