"""FIRE's cache directory (``$FIRE_CACHE_DIR``, default ``~/.cache/fire``), kept private.

It holds what the server trusts: the keys, the compiled library preloaded into tritonserver, the logs,
the decoded datasets. A directory another account created (or can write to) would let that account
plant code or read the keys, so every use goes through ``cache_dir()``, which creates the directory
0700 or refuses one that is not owned by this user or that others can write to (or whose parents let
others swap it), and ``trusted_file()``, which refuses a file to load from there that another user
owns or can write to, or that is a symbolic link. ``trusted_code()`` checks a user's code (a module
``fire protect --torch`` imports, a TorchScript file) the same way before it runs.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from fire_backend.errors import FireError
from fire_backend.names import CACHE_ENV


class UnsafePathError(FireError):
    """A directory or file FIRE would trust is owned by another user or writable by others."""


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (os.geteuid(), 0)


def _check_parents(path: Path) -> None:
    """No parent that another user could use to replace ``path``: each is owned by this user or root,
    and not writable by group or others unless sticky (like /tmp)."""
    for parent in path.parents:
        st = parent.stat()
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if not _owner_ok(st) or (writable and not st.st_mode & stat.S_ISVTX):
            raise UnsafePathError(
                f"{path}: its parent {parent} is owned by uid {st.st_uid} or writable by others; another "
                f"account could replace it. Choose another ${CACHE_ENV}"
            )


def check_private_dir(path: Path) -> Path:
    """``path`` must be a real directory owned by this user that nobody else can write to; it is left
    with no group or other access at all."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path}: not a directory (a symbolic link?); refusing to use it")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(
            f"{path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()}); another account created it. "
            f"Remove it or point ${CACHE_ENV} elsewhere"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, others can write to it (and may have planted files "
            f"there); remove it or point ${CACHE_ENV} elsewhere"
        )
    if st.st_mode & 0o077:  # ours and nobody else could write to it: only narrow who can read it
        os.chmod(path, 0o700)
    _check_parents(path)
    return path


def private_dir(path: str | Path) -> Path:
    """``path`` created 0700 if missing (and its missing parents), then checked (``check_private_dir``)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # created meanwhile: checked below like any other
            path.mkdir(mode=0o700)
    return check_private_dir(path)


def cache_dir(*parts: str) -> Path:
    """The cache directory (or a sub-directory of it), private (see the module docstring)."""
    base = private_dir(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fire")
    return private_dir(base.joinpath(*parts)) if parts else base


def trusted_file(path: str | Path) -> Path:
    """``path`` may be loaded or read as a secret: a regular file (not a link) of this user, that group
    and others cannot write to."""
    path = Path(path)
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path}: not a regular file (a symbolic link?); refusing to load it")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path}: owned by uid {st.st_uid}, not by this user; refusing to load it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(f"{path}: writable by others (mode {stat.S_IMODE(st.st_mode):04o}); refusing it")
    return path


def trusted_code(path: str | Path) -> Path:
    """``path`` (a Python module or a TorchScript file) may be run: a regular file owned by this user or
    root that group and others cannot write to, and so is its compiled copy in ``__pycache__`` if it has
    one (Python runs that instead); the directories holding them (and a symbolic link on the way) no
    other account can write to, not even sticky ones like /tmp, where another account could drop a
    module or a compiled copy beside it that Python prefers; and no directory above them another
    account could use to swap them (owned by this user or root, writable by others only if sticky).
    Returns the resolved path."""
    import importlib.util

    given = Path(path).absolute()
    real = given.resolve()
    files = [real]
    if real.suffix == ".py":
        cached = Path(importlib.util.cache_from_source(str(real)))
        if cached.exists():
            files.append(cached)
    for f in files:
        st = f.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{f}: not a regular file; refusing to run it")
        _code_path_ok(f, st, real)
    for d in dict.fromkeys([given.parent, *(f.parent for f in files)]):
        _code_path_ok(d, d.stat(), real)
    for parent in real.parent.parents:
        st = parent.stat()
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
        if not _owner_ok(st) or writable:
            raise UnsafePathError(f"{parent}: owned by uid {st.st_uid} or writable by others: another account "
                                  f"could swap the code in {real.name} below it; refusing to run it")  # fmt: skip
    return real


def _code_path_ok(p: Path, st: os.stat_result, code: Path) -> None:
    why = (f"owned by uid {st.st_uid}" if not _owner_ok(st)
           else "writable by others" if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) else None)  # fmt: skip
    if why:
        raise UnsafePathError(f"{p}: {why} (mode {stat.S_IMODE(st.st_mode):04o}): another account could have "
                              f"changed the code in {code.name}; refusing to run it")  # fmt: skip


def write_private(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a new file only this user can read, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
