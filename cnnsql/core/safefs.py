"""Files cnnsql writes where secrets or a server's settings live: never through a link planted by
someone else, never in a folder someone else controls.

- `check_private_dir(path)`: the folder and every parent up to / must be owned by root or the caller
  and not writable by others (a sticky parent such as /tmp is fine for its children owned by the
  caller); the folder itself must be owned by the caller. Otherwise one clear error naming the path.
- `write_private(path, text)`: a fresh file created with O_CREAT|O_EXCL|O_NOFOLLOW beside the target,
  mode set and owner changed through its descriptor, then renamed over the target (a rename replaces
  a symlink at the target; it never writes through it).
- `open_append(path)`: append to a regular file that is not a link (O_NOFOLLOW), created if missing.
- `private_dir(path, mode, uid, gid)`: create a folder (or take the existing one if it is a real
  folder, not a link) and set its mode and owner through its descriptor.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cnnsql.core.errors import CnnsqlError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _fix(path: Path) -> str:
    return (f"use a folder owned by you and writable only by you (e.g. chmod 700, or 711 when the server "
            f"runs as another user), with parents owned by you or root: set CNNSQL_HOME (not {path})")


def check_private_dir(path: Path, what: str = "the state folder") -> None:
    """Refuse a folder (or a parent of it) that another user owns or can write into."""
    path = Path(os.path.abspath(path))
    uid = os.geteuid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise CnnsqlError(f"{what} {path} is a symbolic link", _fix(path))
        if not stat.S_ISDIR(st.st_mode):
            raise CnnsqlError(f"{what} {path} is not a folder", _fix(path))
        if st.st_uid != uid:
            raise CnnsqlError(f"{what} {path} belongs to another user (uid {st.st_uid}), not to this one "
                              f"(uid {uid})", _fix(path))
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CnnsqlError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})",
                              _fix(path))
    for parent in path.parents:
        try:
            pst = os.stat(parent)  # the parent as the kernel reaches it (a /tmp link to /private/tmp is fine)
        except FileNotFoundError:
            continue
        if pst.st_uid not in (0, uid):
            raise CnnsqlError(f"{what} {path} lies in {parent}, which belongs to another user (uid {pst.st_uid})",
                              _fix(path))
        writable = pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not pst.st_mode & stat.S_ISVTX:
            raise CnnsqlError(f"{what} {path} lies in {parent}, which other users can write into "
                              f"(mode {stat.S_IMODE(pst.st_mode):o})", _fix(path))


def write_private(path: Path, text: str, mode: int = 0o600, uid: int | None = None, gid: int | None = None) -> None:
    """Write `text` to `path` without following a link: a new file beside it, then a rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else -1)
        with os.fdopen(fd, "w") as f:
            fd = None
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def open_append(path: Path, mode: int = 0o600, uid: int | None = None, gid: int | None = None):
    """A text file opened for appending that is a regular file and not a link; owner set through it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, mode)
    except OSError as exc:
        raise CnnsqlError(f"cannot open {path} safely: {exc.strerror} (a symbolic link?)",
                          f"remove {path} and run the command again") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CnnsqlError(f"{path} is not a regular file", f"remove {path} and run the command again")
    if uid is not None:
        os.fchown(fd, uid, gid if gid is not None else -1)
    return os.fdopen(fd, "a")


def private_dir(path: Path, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    """Create `path` (parents as needed) or take it as it is if it is a real folder; mode and owner are
    set through its descriptor, so a link put in its place is refused, never followed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | DIRECTORY | NOFOLLOW)
    except OSError as exc:
        raise CnnsqlError(f"{path} is not a folder of its own: {exc.strerror} (a symbolic link?)",
                          f"remove {path} and run the command again") from None
    try:
        os.fchmod(fd, mode)
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else -1)
    finally:
        os.close(fd)
