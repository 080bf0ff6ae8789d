"""Advisory file locks (``flock``) for stores that several processes may write at once.

A lock goes with its process: one killed with ``kill -9`` frees it, so a lock file left on
disk never blocks anyone. Without ``fcntl`` (Windows) the locks are no-ops.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold ``lock_file`` (created when missing); when another process holds it, say so
    (``what`` names the thing being written) and wait for it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield
        return
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another process is writing to %s (nest index?); waiting for it "
                           "to finish", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def lock_if_free(lock_file: Path) -> Iterator[bool]:
    """``True`` while holding ``lock_file`` if no process held it, else ``False`` at once: a
    reader never waits, and creates no file (a writer creates the lock file before it
    writes anything else, so a missing one means no writer)."""
    try:
        import fcntl

        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        yield True
        return
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
