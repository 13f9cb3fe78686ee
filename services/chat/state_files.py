"""The disk tier's files: one private directory per conversation store, one file per saved state.

Files are named by a fresh uuid4 (never by anything a client sent), mode 0600, in a 0700 directory of the store
inside `disk_dir` (default: `<tmp>/ark-state-<uid>`). A live store holds a lock on its directory; at start, the
directories of stores that no longer run (a crashed worker) are deleted, so several workers can share one
`disk_dir`. Every failure to write or read is reported to the caller as a lost state (a recompute, never an error).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from services.common.config import ConfigError

log = logging.getLogger(__name__)

_STORE_DIR = re.compile(r"[0-9a-f]{32}")  # only directories named like this are ever cleaned up
_LOCK_FILE = ".lock"


class StateFiles:
    """A store's own locked directory and the files in it."""

    def __init__(self, base: str | Path | None) -> None:
        self.directory, self._lock_fd = _open_store_dir(Path(base) if base else _default_base())

    def write(self, blob: bytes | bytearray) -> Path | None:
        """A new private file holding `blob`; None (logged) when it cannot be written."""
        path = self.directory / uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(blob)
        except OSError as exc:
            log.warning("cannot save a conversation state to %s (%s); it will be recomputed", self.directory, exc)
            path.unlink(missing_ok=True)
            return None
        return path

    @staticmethod
    def take(path: Path) -> bytes | None:
        """The file's bytes, the file deleted; None (logged) when it is unreadable."""
        try:
            return path.read_bytes()
        except OSError as exc:
            log.warning("saved conversation state %s is unreadable (%s); it will be recomputed", path.name, exc)
            return None
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Delete the directory with every file in it and let go of its lock."""
        shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock_fd)


def _default_base() -> Path:
    return Path(tempfile.gettempdir()) / f"ark-state-{os.getuid()}"


def _open_store_dir(base: Path) -> tuple[Path, int]:
    """A fresh 0700 directory for this store inside `base` (made private), locked while the store lives; the
    directories of stores that no longer run are deleted first."""
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = base.lstat()
    except OSError as exc:
        raise ConfigError(f"sessions.disk_dir {str(base)!r}: cannot create it ({exc.strerror})") from exc
    if not base.is_dir() or base.is_symlink() or info.st_uid != os.getuid():
        raise ConfigError(f"sessions.disk_dir {str(base)!r}: must be a directory owned by this user, not a link")
    os.chmod(base, 0o700)
    _remove_stale(base.iterdir())
    # Made under a name the cleanup ignores, locked, then renamed: another store starting now never deletes it.
    staging = Path(tempfile.mkdtemp(prefix=".new-", dir=base))
    fd = os.open(staging / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    own = base / uuid.uuid4().hex
    staging.rename(own)
    return own, fd


def _remove_stale(children: Iterable[Path]) -> None:
    for child in children:
        if not _STORE_DIR.fullmatch(child.name) or child.is_symlink() or not child.is_dir():
            continue
        try:
            fd = os.open(child / _LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a running store's
        finally:
            if fd is not None:
                os.close(fd)  # closing drops the lock we may have taken; the directory goes next
        log.info("removing conversation states left by a stopped worker: %s", child)
        shutil.rmtree(child, ignore_errors=True)
