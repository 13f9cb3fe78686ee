"""Conversation state that outlives a worker's resident contexts: a host-memory tier, then a local-disk tier.

When the resident contexts are full, the generation layer saves the least recently used conversation's state here
instead of dropping it (an opaque blob from the engine, e.g. llama.cpp's KV cells of the conversation) and takes it
back on the conversation's next turn: reading and loading tens of MB takes milliseconds, recomputing thousands of
prompt tokens takes seconds (bench/state_restore.py). Each tier is bounded; within a tier the least recently stored
state leaves first (from host it moves down to disk, from disk it is deleted). A state lost from every tier costs a
recompute, never an error, so every failure here (a full disk, a vanished file) is logged and reported as "not
found".

Fair share: when a tier is full, the state that leaves is the least recent one of an API key holding more than
`key_share` of the tier (then: more than an equal split of it), so a key that floods the worker pushes out its own
states first and the other keys, while within their share, pay at most a move from host to disk, never a deletion
caused by somebody else's flood. A key alone on the worker may use the whole tier: the share only decides who leaves
when room is needed.

States are found by content: `best_match` returns, among one API key's states, the one sharing the longest token
prefix with a request (states never serve another key). A newly saved state supersedes the key's states whose
tokens are a prefix of its own (it serves every request they would, and more) and the state saved earlier under
the same conversation key.

Files: one per state, named by a fresh uuid4 (never by anything a client sent), mode 0600, in a 0700 directory of
this store inside `disk_dir` (default: `<tmp>/ark-state-<uid>`). A live store holds a lock on its directory;
at start, the directories of stores that no longer run (a crashed worker) are deleted, so several workers can
share one `disk_dir`. `close()` deletes the store's files.

Threading: every method is thread-safe (one lock). `put`, `take`, `restore`, `drop`, `drop_session` and `close`
may read, write or delete files, so call them off the event loop (e.g. on the engine's thread or through
`asyncio.to_thread`); `best_match` and the accessors never touch the disk (they may wait for the lock while
another thread does).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from services.chat.metrics import RESTORE_SECONDS, TIER_BYTES, TIER_ENTRIES, TIER_EVICTIONS, TIER_HITS
from services.chat.transcript import shared_prefix
from services.common.config import ConfigError, SessionsConfig

log = logging.getLogger(__name__)

_STORE_DIR = re.compile(r"[0-9a-f]{32}")  # only directories named like this are ever cleaned up
_LOCK_FILE = ".lock"


class Tier(StrEnum):
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True, slots=True)
class StateEntry:
    """What is known about one saved state without reading it."""

    entry_id: str  # uuid4 hex, made here
    api_key_hash: str
    session_id: str  # "" when the request carried no session
    conversation_key: str  # "" when the caller has none
    tokens: tuple[int, ...]  # the token ids whose state the blob holds, in order
    size: int  # bytes of the blob


@dataclass(slots=True)
class _Slot:
    entry: StateEntry
    tokens: np.ndarray  # entry.tokens as an array, for fast prefix comparison
    tier: Tier
    blob: bytes | bytearray | None = None  # host tier
    path: Path | None = None  # disk tier
    stamp: int = 0  # when it was stored (larger is more recent)


class _TierSpace:
    """One tier's entries in least-recently-stored order and its byte accounting, per API key."""

    def __init__(self, tier: Tier, capacity: int, key_share: float) -> None:
        self.tier = tier
        self.capacity = capacity
        self.key_quota = int(capacity * key_share)
        self.slots: OrderedDict[str, _Slot] = OrderedDict()
        self.used = 0
        self.by_key: dict[str, int] = {}

    def add(self, slot: _Slot) -> None:
        self.slots[slot.entry.entry_id] = slot
        self.used += slot.entry.size
        key = slot.entry.api_key_hash
        self.by_key[key] = self.by_key.get(key, 0) + slot.entry.size

    def remove(self, entry_id: str) -> _Slot | None:
        slot = self.slots.pop(entry_id, None)
        if slot is not None:
            self.used -= slot.entry.size
            key = slot.entry.api_key_hash
            left = self.by_key[key] - slot.entry.size
            if left:
                self.by_key[key] = left
            else:
                del self.by_key[key]
        return slot

    def fits(self, size: int) -> bool:
        return size <= self.capacity

    def next_victim(self, key: str, size: int) -> _Slot | None:
        """The state to push out so that `size` more bytes of `key` fit, or None when they already fit.

        The least recent state of a key over its quota goes first (the newcomer's bytes counted), then that of a
        key over an equal split of the tier, then the least recent of all."""
        if self.used + size <= self.capacity:
            return None

        def holds(owner: str) -> int:
            return self.by_key.get(owner, 0) + (size if owner == key else 0)

        equal_split = self.capacity / len(set(self.by_key) | {key})
        for limit in (self.key_quota, equal_split):
            for slot in self.slots.values():
                if holds(slot.entry.api_key_hash) > limit:
                    return slot
        return next(iter(self.slots.values()))


class StateTiers:
    """Saved conversation states of one model on one worker, in host memory then on local disk."""

    def __init__(
        self,
        *,
        host_bytes: int,
        disk_bytes: int,
        key_share: float = 0.5,
        disk_dir: str | Path | None = None,
        model: str = "",
    ) -> None:
        if host_bytes < 0 or disk_bytes < 0:
            raise ValueError("tier sizes must not be negative")
        if not 0 < key_share <= 1:
            raise ValueError("key_share must be in (0, 1]")
        self._model = model
        self._lock = threading.Lock()
        self._tiers = {
            Tier.HOST: _TierSpace(Tier.HOST, host_bytes, key_share),
            Tier.DISK: _TierSpace(Tier.DISK, disk_bytes, key_share),
        }
        self._where: dict[str, Tier] = {}  # entry id -> tier
        self._by_key: dict[str, set[str]] = {}  # api key hash -> entry ids
        self._by_conversation: dict[tuple[str, str], str] = {}  # (api key hash, conversation key) -> entry id
        self._stamp = 0
        self._dir: Path | None = None
        self._lock_fd: int | None = None
        if disk_bytes:
            self._dir, self._lock_fd = _open_store_dir(Path(disk_dir) if disk_dir else _default_base())
        self._publish()

    @classmethod
    def from_config(cls, sessions: SessionsConfig, model: str) -> StateTiers:
        """The tiers of one chat model, sized by the `sessions` section of the configuration."""
        mb = 1024 * 1024
        return cls(
            host_bytes=int(sessions.host_cache_mb * mb),
            disk_bytes=int(sessions.disk_cache_mb * mb),
            key_share=sessions.key_share,
            disk_dir=sessions.disk_dir,
            model=model,
        )

    @property
    def directory(self) -> Path | None:
        """This store's own directory (None when the disk tier is off)."""
        return self._dir

    # -- saving -------------------------------------------------------------------------------------------------

    def put(
        self,
        *,
        api_key_hash: str,
        session_id: str,
        conversation_key: str,
        tokens: Sequence[int],
        blob: bytes | bytearray,
    ) -> StateEntry | None:
        """Save a state; None when no tier can hold it (the caller will recompute, as for any lost state).

        The store keeps `blob` itself (tens of MB: no copy), so the caller must not change it afterwards."""
        entry = StateEntry(uuid.uuid4().hex, api_key_hash, session_id, conversation_key, tuple(tokens), len(blob))
        slot = _Slot(entry, np.asarray(entry.tokens, dtype=np.int64), Tier.HOST, blob=blob)
        with self._lock:
            for old in self._superseded(entry, slot.tokens):
                self._drop_locked(old)
            self._where_add(slot)
            placed = self._place(slot, Tier.HOST)
            if not placed:
                self._where_remove(entry)
            self._publish()
            return entry if placed else None

    def _superseded(self, entry: StateEntry, tokens: np.ndarray) -> list[str]:
        ids = []
        if entry.conversation_key:
            same = self._by_conversation.get((entry.api_key_hash, entry.conversation_key))
            if same is not None:
                ids.append(same)
        for entry_id in self._by_key.get(entry.api_key_hash, ()):
            old = self._slot(entry_id)
            n = len(old.tokens)
            if entry_id not in ids and n <= len(tokens) and np.array_equal(old.tokens, tokens[:n]):
                ids.append(entry_id)
        return ids

    def _place(self, slot: _Slot, tier: Tier) -> bool:
        """Put `slot` in `tier`, pushing others down or out; falls through to lower tiers. False: held nowhere."""
        space = self._tiers[tier]
        size = slot.entry.size
        if not space.fits(size):
            return self._place_lower(slot, tier)
        while (victim := space.next_victim(slot.entry.api_key_hash, size)) is not None:
            space.remove(victim.entry.entry_id)
            TIER_EVICTIONS.labels(self._model, tier).inc()
            if not self._place_lower(victim, tier):
                self._forget(victim)
        if tier is Tier.DISK and not self._write(slot):
            return False
        slot.tier = tier
        self._where[slot.entry.entry_id] = tier
        self._stamp += 1
        slot.stamp = self._stamp
        space.add(slot)
        return True

    def _place_lower(self, slot: _Slot, tier: Tier) -> bool:
        if tier is Tier.HOST and self._dir is not None:
            return self._place(slot, Tier.DISK)
        self._discard_file(slot)
        return False

    def _write(self, slot: _Slot) -> bool:
        assert self._dir is not None and slot.blob is not None
        path = self._dir / uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(slot.blob)
        except OSError as exc:
            log.warning("cannot save a conversation state to %s (%s); it will be recomputed", self._dir, exc)
            path.unlink(missing_ok=True)
            return False
        slot.path, slot.blob = path, None
        return True

    # -- finding and restoring ----------------------------------------------------------------------------------

    def best_match(self, api_key_hash: str, tokens: Sequence[int]) -> tuple[StateEntry, int] | None:
        """The key's state sharing the longest token prefix with `tokens`, and that prefix's length (None: no
        state shares even one token). Ties go to the host tier, then to the most recently stored."""
        query = np.asarray(tokens, dtype=np.int64)
        best: tuple[int, int, int] | None = None
        found: StateEntry | None = None
        with self._lock:
            for entry_id in self._by_key.get(api_key_hash, ()):
                slot = self._slot(entry_id)
                matched = shared_prefix(query, slot.tokens)
                rank = (matched, slot.tier is Tier.HOST, slot.stamp)
                if matched and (best is None or rank > best):
                    best, found = rank, slot.entry
        return None if found is None or best is None else (found, best[0])

    def take(self, entry_id: str) -> tuple[Tier, bytes | bytearray] | None:
        """Remove a state from the store and return it with the tier it came from (None: it is gone)."""
        with self._lock:
            tier = self._where.get(entry_id)
            if tier is None:
                return None
            slot = self._tiers[tier].remove(entry_id)
            assert slot is not None
            self._where_remove(slot.entry)
            self._publish()
        if slot.blob is not None:
            blob = slot.blob
        else:
            assert slot.path is not None
            try:
                blob = slot.path.read_bytes()
            except OSError as exc:
                log.warning("saved conversation state %s is unreadable (%s); it will be recomputed", entry_id, exc)
                return None
            finally:
                slot.path.unlink(missing_ok=True)
        TIER_HITS.labels(self._model, tier).inc()
        return tier, blob

    def restore(self, entry_id: str, load: Callable[[bytes | bytearray], object]) -> Tier | None:
        """`take` the state and hand it to `load` (which puts it into a context), timing both for the restore
        latency metric. None when the state is gone or `load` failed (raised, or returned False; logged): the
        caller recomputes, and its context must be left empty, as a failed load should."""
        start = time.perf_counter()
        taken = self.take(entry_id)
        if taken is None:
            return None
        tier, blob = taken
        try:
            loaded = load(blob)
        except Exception:
            log.warning("cannot load saved conversation state %s; it will be recomputed", entry_id, exc_info=True)
            return None
        if loaded is False:
            return None
        RESTORE_SECONDS.labels(self._model, tier).observe(time.perf_counter() - start)
        return tier

    # -- dropping -----------------------------------------------------------------------------------------------

    def drop(self, entry_id: str) -> bool:
        """Remove one state from every tier (its file deleted)."""
        with self._lock:
            dropped = self._drop_locked(entry_id)
            self._publish()
            return dropped

    def drop_session(self, session_id: str) -> int:
        """Remove every state saved for a session (expiry, DELETE), from every tier; returns how many."""
        if not session_id:
            return 0  # "" marks states saved without a session: they belong to no session to end
        with self._lock:
            ids = [i for i, t in self._where.items() if self._tiers[t].slots[i].entry.session_id == session_id]
            for entry_id in ids:
                self._drop_locked(entry_id)
            self._publish()
            return len(ids)

    def close(self) -> None:
        """Delete every saved state and this store's directory."""
        with self._lock:
            for entry_id in list(self._where):
                self._drop_locked(entry_id)
            self._publish()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> StateTiers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accessors ----------------------------------------------------------------------------------------------

    def tier_of(self, entry_id: str) -> Tier | None:
        with self._lock:
            return self._where.get(entry_id)

    def used_bytes(self, tier: Tier, api_key_hash: str | None = None) -> int:
        """Bytes held in a tier, in all or for one API key."""
        with self._lock:
            space = self._tiers[tier]
            return space.used if api_key_hash is None else space.by_key.get(api_key_hash, 0)

    def entries(self, api_key_hash: str | None = None) -> list[StateEntry]:
        """The states held: the disk tier's, then the host tier's, each least recently stored first."""
        with self._lock:
            found = [s.entry for t in (Tier.DISK, Tier.HOST) for s in self._tiers[t].slots.values()]
        return [e for e in found if api_key_hash is None or e.api_key_hash == api_key_hash]

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)

    # -- bookkeeping (lock held) --------------------------------------------------------------------------------

    def _slot(self, entry_id: str) -> _Slot:
        return self._tiers[self._where[entry_id]].slots[entry_id]

    def _where_add(self, slot: _Slot) -> None:
        entry = slot.entry
        self._where[entry.entry_id] = slot.tier
        self._by_key.setdefault(entry.api_key_hash, set()).add(entry.entry_id)
        if entry.conversation_key:
            self._by_conversation[(entry.api_key_hash, entry.conversation_key)] = entry.entry_id

    def _where_remove(self, entry: StateEntry) -> None:
        self._where.pop(entry.entry_id, None)
        ids = self._by_key.get(entry.api_key_hash)
        if ids is not None:
            ids.discard(entry.entry_id)
            if not ids:
                del self._by_key[entry.api_key_hash]
        conversation = (entry.api_key_hash, entry.conversation_key)
        if self._by_conversation.get(conversation) == entry.entry_id:
            del self._by_conversation[conversation]

    def _forget(self, slot: _Slot) -> None:
        """A state pushed out of the last tier: it is no longer anywhere."""
        self._where_remove(slot.entry)
        self._discard_file(slot)

    def _drop_locked(self, entry_id: str) -> bool:
        tier = self._where.get(entry_id)
        if tier is None:
            return False
        slot = self._tiers[tier].remove(entry_id)
        assert slot is not None
        self._forget(slot)
        return True

    def _discard_file(self, slot: _Slot) -> None:
        if slot.path is not None:
            slot.path.unlink(missing_ok=True)
            slot.path = None
        slot.blob = None

    def _publish(self) -> None:
        for tier, space in self._tiers.items():
            TIER_BYTES.labels(self._model, tier).set(space.used)
            TIER_ENTRIES.labels(self._model, tier).set(len(space.slots))


# -- the store's directory ------------------------------------------------------------------------------------------


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
