"""Containment of data paths: a path named by data (a texts row, an annotation, a benchmark line, a file found under
an input folder) is read only when it resolves, symlinks followed, inside the directory it belongs to.
Every loader and the retrain ingest go through `inside`."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath


class OutsideRoot(ValueError):
    """A path that leaves the directory it must stay in (absolute, `..`, or a symlink pointing out)."""


def inside(root: str | Path, relative: str | Path) -> Path:
    """`root / relative` resolved (symlinks followed); raises OutsideRoot unless it stays under resolved `root`."""
    if isinstance(relative, str) and "\0" in relative:
        raise OutsideRoot(f"path {display(relative)!r} contains a NUL byte")
    base = Path(root).resolve()
    try:
        path = (base / relative).resolve()
    except (OSError, RuntimeError, ValueError) as err:
        raise OutsideRoot(f"path {display(relative)!r} cannot be resolved ({err})") from None
    if path != base and not path.is_relative_to(base):
        raise OutsideRoot(f"path {display(relative)!r} resolves outside {display(root)}")
    return path


def relative_key(relative: str) -> str:
    """A data-named relative path in normal form (`a/./b` -> `a/b`); raises OutsideRoot for an absolute path or
    one that climbs out with `..`, before anything is resolved on disk."""
    if "\0" in relative:
        raise OutsideRoot(f"path {display(relative)!r} contains a NUL byte")
    if PurePosixPath(relative).is_absolute():
        raise OutsideRoot(f"path {display(relative)!r} is absolute (give it relative to its folder)")
    norm = os.path.normpath(relative)
    if norm == ".." or norm.startswith("../"):
        raise OutsideRoot(f"path {display(relative)!r} climbs out of its folder with '..'")
    return norm


def display(path: str | Path) -> str:
    """A path as printable UTF-8: bytes of a non-UTF-8 file name shown as \\xNN escapes."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


SPECIAL_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_kind(path: str | Path, follow: bool = True) -> str | None:
    """What `path` is when it is not a regular file (a directory, FIFO, socket or device), from its mode alone:
    nothing is opened, so a FIFO never blocks. None for a regular file or a path that does not exist."""
    try:
        mode = os.stat(path, follow_symlinks=follow).st_mode
    except (OSError, ValueError):
        return None
    return next((kind for test, kind in SPECIAL_KINDS if test(mode)), None)
