"""Build (once) the library preloaded into tritonserver: the keys stay out of its arguments and its
shared-memory regions are private (0600).

See ``native/server_guard.c``: the arguments carry each key's ``placeholder``, the environment the key
(``Key.env``), and the library substitutes one for the other before tritonserver's main() runs. The
library lives in the private cache directory; one found there that another user owns or can write to
is refused (it would run inside the server)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from fire_backend.cache import cache_dir, trusted_file
from fire_backend.errors import FireError
from fire_backend.keys import Key
from fire_backend.names import PARENT_ENV  # noqa: F401 - the launcher sets it (serving.server)

SOURCE = Path(__file__).resolve().parent / "native" / "server_guard.c"


def placeholder(key: Key) -> str:
    """What stands for ``key`` in tritonserver's arguments (native/server_guard.c's KEYS table)."""
    return f"@{key.env}@"


class ServerGuardError(FireError):
    """The library could not be built: the server is not started with its keys in the open."""


def library_path(cache: Path | None = None) -> Path:
    """Where the compiled library of this source lives in the private cache (keyed by the source)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return (cache or cache_dir("native")) / f"libfire_server_guard-{digest}.so"


def library(cache: Path | None = None) -> Path:
    """The compiled library, built with the system C compiler the first time (a machine without one can
    be given the file built elsewhere at ``library_path()``, as the GPU check does)."""
    target = library_path(cache)
    cache = target.parent
    if target.exists():
        return trusted_file(target)
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise ServerGuardError(
            f"no C compiler to build {SOURCE.name} (it keeps the keys out of the server's command line, "
            "which every local user can read): install gcc, or build it once as in deploy/Dockerfile"
        )
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", tmp, str(SOURCE)], check=True, capture_output=True)
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise ServerGuardError(f"building {SOURCE.name} failed: {e.stderr.decode(errors='replace')}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
