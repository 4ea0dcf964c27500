"""The server's two keys: who may do what on Triton's raw ports.

Triton restricts API categories to requests carrying a header with a key (``--http-restricted-api``,
``--grpc-restricted-protocol``). FIRE uses two:

- the **admin key**: model repository, shared memory, statistics, logging, trace; for the operator;
- the **inference key**: inference, model metadata, model config; for the gateway (which adds it to the
  requests for protected models only, after checking them) and for the operator's own tools.

So a local account that reaches the loopback ports without a key can ask whether the server is live,
and nothing else: not ``<name>_head`` / ``_tail`` (the unprotected halves), not the direction's metadata.

Each key comes from its environment variable if set, else from its file in the private cache directory
(``fire serve`` creates it, mode 0600). A key is never an argument of any process.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from fire_backend.cache import cache_dir, trusted_file, write_private
from fire_backend.errors import FireError
from fire_backend.names import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE,
    GRPC_KEY_PREFIX,
    INFERENCE_HEADER,
    INFERENCE_KEY_ENV,
    INFERENCE_KEY_FILE,
)


class KeyMissingError(FireError):
    """No key where FIRE looks for it; the message says where and how to get one."""


# What a key may be made of: it travels in Triton's --*-restricted-* syntax (``,`` ``:`` ``=`` are
# separators there) and in HAProxy's configuration (``%`` starts a format there).
KEY_CHARS = re.compile(r"[A-Za-z0-9._~-]{16,256}")


def _checked(key: Key, value: str, where: str) -> str:
    if not KEY_CHARS.fullmatch(value):
        raise FireError(f"the {key.name} key from {where} must be 16-256 of A-Z a-z 0-9 . _ ~ - (e.g. from "
                        "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")  # fmt: skip
    return value


@dataclass(frozen=True)
class Key:
    name: str
    header: str  # the HTTP header; gRPC metadata key: ``grpc_header``
    env: str  # environment variable that may hold it
    file_name: str  # else this file in the cache directory
    categories: str  # Triton API categories it opens

    @property
    def grpc_header(self) -> str:
        return GRPC_KEY_PREFIX + self.header

    def file(self) -> Path:
        return cache_dir() / self.file_name

    def headers(self, value: str, protocol: str) -> dict[str, str]:
        return {self.grpc_header if protocol == "grpc" else self.header: value}

    def read(self) -> str:
        """The key: its environment variable, else its file (which must be this user's, not writable
        by others)."""
        value = os.environ.get(self.env)
        if value:
            return _checked(self, value, f"${self.env}")
        path = self.file()
        if not path.is_file():
            raise KeyMissingError(f"no {self.name} key: set ${self.env}, or start the server with `fire serve` "
                                  f"first (it writes {path})")  # fmt: skip
        return _checked(self, trusted_file(path).read_text().strip(), str(path))

    def find(self) -> str | None:
        """The key if there is one, else None (a client that may run without it)."""
        try:
            return self.read()
        except KeyMissingError:
            return None

    def ensure(self) -> tuple[str, str]:
        """(the key, where it came from): the environment's or the file's, else a new one written 0600."""
        if os.environ.get(self.env) or self.file().is_file():
            return self.read(), f"${self.env}" if os.environ.get(self.env) else str(self.file())
        path = self.file()
        value = secrets.token_urlsafe(24)
        write_private(path, (value + "\n").encode())
        return value, f"{path} (new, mode 0600)"


ADMIN_CATEGORIES = "model-repository,shared-memory,statistics,logging,trace"
ADMIN = Key("admin", ADMIN_HEADER, ADMIN_KEY_ENV, ADMIN_KEY_FILE, ADMIN_CATEGORIES)
INFERENCE = Key("inference", INFERENCE_HEADER, INFERENCE_KEY_ENV, INFERENCE_KEY_FILE, "inference,metadata,model-config")
KEYS = (ADMIN, INFERENCE)
