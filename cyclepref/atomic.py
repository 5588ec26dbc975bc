"""Atomic files and directories: written under a temporary name beside the target, renamed when complete, with the
modes the process umask gives (tempfile's own files are owner-only)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(path: Path) -> Path:
    """An empty temporary file beside `path`, with the mode a plain open() would give it (0666 minus the umask;
    tempfile's own files are owner-only)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())
    return Path(tmp)


def temp_dir(path: Path) -> Path:
    """A temporary directory beside `path`, with the mode mkdir would give it (0777 minus the umask)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_file(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def follow_umask(root: Path) -> None:
    """Give every file and directory under `root` the mode open() / mkdir would (0666 / 0777 minus the umask, execute
    bits kept; symbolic links and what they point to untouched): libraries that write through their own temporary
    files (safetensors, peft) leave them owner-only."""
    mask = umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in (Path(dirpath, name) for name in dirnames + filenames):
            if entry.is_symlink():
                continue
            full = entry.is_dir() or os.stat(entry).st_mode & 0o111
            os.chmod(entry, (0o777 if full else 0o666) & ~mask)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success its tree gets the umask's modes and replaces `path`; on
    error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path)
    try:
        yield tmp
        follow_umask(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
