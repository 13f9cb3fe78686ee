"""Where llama.cpp's unified KV cache keeps each sequence's cells: its cell allocator, followed step by step.

ggml's CPU attention computes every row over every cell up to the highest one in use, whether the row attends to
it or not (a cell it does not attend to still costs a mask check per layer and head: about 0.35 us per row and
cell for SmolLM2-135M, docs/benchmarks.md). So where the cells are matters as much as how many there are: idle
sequences left at the top of the cache after a burst make every row of the next one walk up to them. llama.cpp's
API does not say where cells are, but this engine issues every operation that places or frees them (decodes,
`seq_rm`, `seq_cp`, state imports), all on one thread, so `CellMap` applies the cache's own rules to the same
operations (`llama_kv_cache::find_slot`, `apply_ubatch`, `seq_rm`, `seq_cp` and `state_read_meta` in the vendored
src/llama-kv-cache.cpp of llama-cpp-python 0.3.36: one stream, no sliding window, one ubatch per decode) and knows
what the cache holds where. tests/integration/test_kv_cells.py checks it against llama.cpp's own cache log.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np

_END = np.iinfo(np.int32).max
_STATE_MAGIC = 0xAF143CD8  # llama-context.cpp's io_magic, first in a sequence state


class CellMap:
    """The cells of one unified KV cache: which sequences hold each cell, at which position, and where the next
    placement starts (`head`)."""

    def __init__(self, n_cells: int) -> None:
        self.size = n_cells
        self.used = 0  # cells held by at least one sequence
        self.changes = 0  # counts the operations that changed the map: its version
        self.head = 0  # where llama.cpp's next search for free cells starts
        self._holders = np.zeros(n_cells, dtype=np.int32)  # how many sequences hold each cell
        self._cells: dict[int, dict[int, int]] = {}  # sequence -> position -> cell

    # -- what the cache looks like ------------------------------------------------------------------------------------

    @property
    def walk(self) -> int:
        """One past the highest cell in use (llama.cpp's `used_max_p1`): what every row's attention walks."""
        held = np.flatnonzero(self._holders)
        return int(held[-1]) + 1 if len(held) else 0

    def top(self, seq: int) -> int:
        """One past the highest cell `seq` holds (0: none)."""
        cells = self._cells.get(seq)
        return max(cells.values()) + 1 if cells else 0

    def cells(self, seq: int) -> dict[int, int]:
        """`seq`'s cells by position (a copy)."""
        return dict(self._cells.get(seq, {}))

    def clone(self) -> CellMap:
        """An independent copy, to try a plan on."""
        other = CellMap(self.size)
        other.used, other.head, other.changes = self.used, self.head, self.changes
        other._holders = self._holders.copy()
        other._cells = {seq: dict(cells) for seq, cells in self._cells.items()}
        return other

    def shared_prefix(self, seq: int, other: int) -> int:
        """How many of `seq`'s first positions are the very cells `other` holds at them."""
        mine, theirs = self._cells.get(seq, {}), self._cells.get(other, {})
        n = 0
        while n in mine and mine[n] == theirs.get(n):
            n += 1
        return n

    # -- what the engine does to it -----------------------------------------------------------------------------------

    def place(self, tokens: Sequence[tuple[int, int]]) -> bool:
        """A decode of `tokens` (sequence, position), in batch order, went through: each takes the next free cell
        from `head` on, wrapping round (from the start instead when more than twice the batch is free below `head`);
        False if they did not fit (llama.cpp then places none)."""
        n = len(tokens)
        if not n:
            return True
        start = 0 if self.head > self.used + 2 * n else self.head
        free = np.flatnonzero(self._holders == 0)
        if len(free) < n:
            return False
        split = int(np.searchsorted(free, start))
        chosen = np.concatenate((free[split:], free[:split]))[:n]
        self._holders[chosen] = 1
        for (seq, pos), cell in zip(tokens, chosen.tolist(), strict=True):
            self._cells.setdefault(seq, {})[pos] = cell
        self.used += n
        self.head = int(chosen[-1]) + 1
        self.changes += 1
        return True

    def remove(self, seq: int, p0: int = 0, p1: int = _END) -> None:
        """`llama_memory_seq_rm(seq, p0, p1)` (p1 excluded): a cell no sequence holds any more is free, and the next
        search starts from the lowest one freed if that is below `head`."""
        cells = self._cells.get(seq)
        if not cells:
            return
        lowest = self.size
        for pos in [p for p in cells if p0 <= p < p1]:
            cell = cells.pop(pos)
            self._holders[cell] -= 1
            if self._holders[cell] == 0:
                self.used -= 1
                lowest = min(lowest, cell)
        if not cells:
            del self._cells[seq]
        self.head = min(self.head, lowest)
        self.changes += 1

    def copy(self, source: int, target: int, p0: int = 0, p1: int = _END) -> None:
        """`llama_memory_seq_cp(source, target, p0, p1)`: `target` also holds `source`'s cells in the range (one
        cache: the cells are shared, not copied)."""
        if source == target:
            return
        into = self._cells.setdefault(target, {})
        for pos, cell in self._cells.get(source, {}).items():
            if p0 <= pos < p1 and into.get(pos) != cell:
                into[pos] = cell
                self._holders[cell] += 1
        if not into:
            del self._cells[target]
        self.changes += 1

    def load(self, seq: int, positions: Iterable[int]) -> bool:
        """A state import into `seq` went through: llama.cpp cleared the sequence, then placed the saved cells (in
        the order they were saved, `saved_positions`) as a decode would."""
        self.remove(seq)
        return self.place([(seq, pos) for pos in positions])


def saved_positions(data: bytes | bytearray | memoryview) -> list[int] | None:
    """The positions of a sequence state's cells (`llama_state_seq_get_data`), in the order they were saved (cell
    order, which a sequence whose cells filled holes has out of position order); None if the bytes are not one
    stream of single-sequence cells."""
    try:  # llama_context::state_seq_get_data: a magic number and the sequence, then llama_kv_cache::state_write
        magic, _, n_stream, count = struct.unpack_from("<IiII", data, 0)
        if magic != _STATE_MAGIC or n_stream != 1:
            return None
        records = np.frombuffer(data, dtype="<i4", count=3 * count, offset=16).reshape(count, 3)
    except (struct.error, ValueError):
        return None
    if count and not (records[:, 1] == 1).all():
        return None
    return records[:, 0].tolist()
