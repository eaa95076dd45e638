"""One process per directory: an advisory lock file, and the removal of temporaries that a killed process left.

The lock is ``<dir>/.lock`` held with ``fcntl.flock`` for as long as the run holds it. The kernel releases a flock
when its holder exits in any way (a crash or SIGKILL included), so a lock file left by a killed process does not
block anyone: the next process locks it and goes on. A holder removes the file on release, while it still holds it,
and a process that locked a file which was removed meanwhile (it opened it just before) finds that the path no
longer names that file and tries again, so two processes never hold "the" lock through two different files.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .config import ConfigError

__all__ = ["LOCK_NAME", "DirectoryBusy", "DirectoryLock", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class DirectoryBusy(ConfigError):
    """Another process holds the directory's lock."""


class DirectoryLock:
    """An exclusive lock on a directory (that exists), for one process; not reentrant: a second
    :class:`DirectoryLock` on the same directory is refused even within the process that holds the first.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`.

    Raises:
        DirectoryBusy: from :meth:`acquire` when another holder has it (never waits).
    """

    def __init__(self, directory: str | Path, what: str = "directory", hint: str = "") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.hint = hint
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "DirectoryLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no advisory locks to take
            logger.warning("no fcntl on this platform: %s is not locked against other processes", self.directory)
            return self
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this object")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DirectoryBusy(
                    f"{self.what} {str(self.directory)!r} is in use by another lcompress process (it holds "
                    f"{str(self.path)!r}); one process per {self.what}: wait for it to finish"
                    + (f", {self.hint}" if self.hint else "")
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)  # its holder removed it on release after we opened it: lock the current file instead

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # still held: nobody can have locked the file being removed
        except FileNotFoundError:
            pass
        except OSError as e:  # e.g. the directory became read-only: the file stays, unlocked, harmless
            logger.debug("cannot remove %s: %s", self.path, e)
        finally:
            os.close(fd)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Remove the temporary files that writes of ``names`` (``atomic_write``'s ``<name>.<unique>.tmp``, the older
    ``<name>.tmp``, or ``tempfile``'s ``<name>.<random>.tmp``) left in ``directory`` when their process was killed.
    Call it only while holding the directory's lock: another live writer's temporaries would go too.

    Returns:
        the files removed.
    """
    pattern = re.compile("^(?:" + "|".join(re.escape(n) for n in names) + r")(?:\.[A-Za-z0-9_]+)*\.tmp$")
    removed = []
    for p in Path(directory).iterdir():
        if pattern.match(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    if removed:
        logger.info("removed %d temporary file(s) an interrupted write left in %s: %s", len(removed), directory,
                    ", ".join(p.name for p in removed))
    return removed
