"""Atomic file writes: a reader sees the old file or the new one, never a partial one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

__all__ = ["atomic_write", "atomic_save", "atomic_write_text"]


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; not possible on every platform, so failures are ignored."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a temporary ``<path>.<pid>.<random>.tmp`` beside ``path`` (unique, so that two
    writers never share one), flush and fsync it, then rename it over ``path``.

    The file gets the permissions of any new file, 0o666 less the user's umask (a temporary file from
    ``tempfile.mkstemp`` would be 0o600, and the rename would keep that). On any error (or interruption) the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:  # (open() creates with mode 0o666 & ~umask)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write UTF-8 text through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
