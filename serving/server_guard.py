"""Build (once) the library preloaded into tritonserver: the admin key stays out of its arguments and its
shared-memory regions are private (0600).

See ``native/server_guard.c``: the arguments carry ``KEY_PLACEHOLDER``, the environment the key, and the
library substitutes one for the other before tritonserver's main() runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

KEY_PLACEHOLDER = "@FIRE_ADMIN_KEY@"
KEY_ENV = "FIRE_ADMIN_KEY"
PARENT_ENV = "FIRE_PARENT_PID"  # the launcher: the server is sent SIGTERM when it dies
SOURCE = Path(__file__).resolve().parent / "native" / "server_guard.c"


class ServerGuardError(RuntimeError):
    """The library could not be built: the server is not started with its key in the open."""


def library(cache: Path | None = None) -> Path:
    """The compiled library, built with the system C compiler the first time (keyed by the source)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = cache or Path(os.environ.get("FIRE_CACHE_DIR", Path.home() / ".cache" / "fire")) / "native"
    target = cache / f"libfire_server_guard-{digest}.so"
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise ServerGuardError(
            f"no C compiler to build {SOURCE.name} (it keeps the admin key out of the server's command line, "
            "which every local user can read): install gcc, or build it once as in deploy/Dockerfile"
        )
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", tmp, str(SOURCE)], check=True, capture_output=True)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise ServerGuardError(f"building {SOURCE.name} failed: {e.stderr.decode(errors='replace')}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
