"""The KV cell map's rules on hand-made layouts (tests/integration/test_kv_cells.py checks them against llama.cpp's
own cache), and the plan that moves idle sequences down (`_repack`)."""

from __future__ import annotations

import struct

from services.chat.engines.kv_cells import CellMap, saved_positions
from services.chat.engines.llama_context import _repack


def _tokens(seq: int, start: int, n: int) -> list[tuple[int, int]]:
    return [(seq, pos) for pos in range(start, start + n)]


def test_cells_are_taken_from_the_head_on_and_the_walk_reaches_the_highest_in_use():
    cells = CellMap(100)
    assert cells.place(_tokens(0, 0, 10)) and cells.place(_tokens(1, 0, 10))
    assert (cells.walk, cells.used, cells.head) == (20, 20, 20)
    cells.remove(0)  # frees 0-9: the next search starts there
    assert (cells.walk, cells.used, cells.head) == (20, 10, 0)
    cells.place(_tokens(2, 0, 15))  # fills the hole, then goes on above the other sequence
    assert sorted(cells.cells(2).values()) == [*range(10), *range(20, 25)]
    assert cells.head == 25 and cells.walk == 25


def test_a_search_starts_from_the_beginning_when_more_than_twice_the_batch_is_free_below_the_head():
    cells = CellMap(100)
    cells.place(_tokens(0, 0, 40))
    cells.place(_tokens(1, 0, 10))  # cells 40-49
    cells.remove(0, 0, 40)
    cells.head = 50  # as after a sequence above freed nothing lower
    cells.place(_tokens(1, 10, 4))  # 50 > 10 + 2 * 4: from the start
    assert [cells.cells(1)[pos] for pos in range(10, 14)] == [0, 1, 2, 3]
    cells.place(_tokens(1, 14, 20))  # 4 <= 14 + 40: from the head
    assert min(c for p, c in cells.cells(1).items() if p >= 14) == 4


def test_a_search_wraps_round_and_a_batch_that_does_not_fit_places_nothing():
    cells = CellMap(10)
    cells.place(_tokens(0, 0, 8))
    cells.remove(0, 0, 3)  # cells 0-2 free, head 0
    cells.head = 9
    assert cells.place(_tokens(1, 0, 3))  # 8 and 9 would be past the end: 9 is free, then 0, 1
    assert sorted(cells.cells(1).values()) == [0, 1, 9]
    before = (cells.walk, cells.used, cells.head)
    assert not cells.place(_tokens(2, 0, 3))  # two cells left (2 and 8)
    assert (cells.walk, cells.used, cells.head) == before and cells.top(2) == 0


def test_a_copied_prefix_shares_its_cells_and_they_stay_until_no_sequence_holds_them():
    cells = CellMap(100)
    cells.place(_tokens(0, 0, 30))
    cells.copy(0, 1, 0, 20)
    assert cells.used == 30 and cells.shared_prefix(1, 0) == 20
    cells.remove(0)
    assert cells.used == 20 and cells.walk == 20 and cells.head == 20
    cells.remove(1, 5)
    assert cells.used == 5 and cells.head == 5


def test_a_clone_is_independent():
    cells = CellMap(50)
    cells.place(_tokens(0, 0, 10))
    other = cells.clone()
    other.remove(0)
    assert cells.used == 10 and cells.top(0) == 10 and other.used == 0


def test_a_loaded_state_is_placed_in_the_order_it_was_saved():
    cells = CellMap(50)
    cells.place(_tokens(0, 0, 5))
    assert cells.load(1, [3, 4, 0, 1, 2])
    assert cells.cells(1) == {3: 5, 4: 6, 0: 7, 1: 8, 2: 9}


def test_saved_positions_are_read_from_a_sequence_state():
    records = b"".join(struct.pack("<iIi", pos, 1, 7) for pos in (2, 0, 1))
    state = struct.pack("<IiII", 0xAF143CD8, 7, 1, 3) + records + b"\x00" * 64
    assert saved_positions(state) == [2, 0, 1]
    assert saved_positions(b"\x00" * 32) is None  # not a state
    assert saved_positions(struct.pack("<IiII", 0xAF143CD8, 7, 2, 3) + records) is None  # two streams


def test_idle_sequences_are_moved_down_and_a_shared_prefix_is_shared_again():
    cells = CellMap(400)
    cells.place(_tokens(0, 0, 100))  # 0-99, cleared below
    cells.place(_tokens(1, 0, 50))  # 100-149
    cells.copy(1, 2, 0, 30)  # 2 borrows 1's first 30 cells
    cells.place(_tokens(2, 30, 20))  # 150-169
    cells.place(_tokens(3, 0, 100))  # 170-269, cleared below
    cells.place(_tokens(4, 0, 40))  # 270-309
    cells.remove(0)
    cells.remove(3)
    plan = _repack(cells, [4, 2, 1])  # most recent first
    # 4 goes first, lowest; 2 next; 1 shares its first 30 cells with 2 again.
    assert plan == [(-1, 0), (-1, 0), (2, 30)]
    trial = cells.clone()
    for seq in (4, 2, 1):
        trial.remove(seq)
    for seq, (source, shared) in zip((4, 2, 1), plan, strict=True):
        trial.load(seq, sorted(cells.cells(seq), key=lambda pos: cells.cells(seq)[pos]))
        if shared:
            trial.remove(seq, 0, shared)
            trial.copy(source, seq, 0, shared)
    # The copy 1 was loaded with is gone; its 30 cells are holes that the next cells placed fill first.
    assert trial.used == cells.used == 110 and trial.walk == 140 and trial.head == 90
    assert trial.shared_prefix(1, 2) == 30 and trial.top(4) == 40 and trial.top(2) == 90


def test_no_move_is_planned_when_it_would_not_bring_the_walk_down():
    cells = CellMap(100)
    cells.place(_tokens(0, 0, 20))
    assert _repack(cells, [0]) is None


def test_a_moved_sequence_shares_its_prefix_again_with_one_that_stays():
    cells = CellMap(400)
    cells.place(_tokens(0, 0, 100))  # cleared below
    cells.place(_tokens(1, 0, 60))  # a conversation: stays at 100-159
    cells.copy(1, 2, 0, 40)  # a prompt cache borrowed its first 40 cells
    cells.place(_tokens(2, 40, 30))  # 160-189
    cells.place(_tokens(3, 0, 100))  # 190-289, cleared below
    cells.place(_tokens(4, 0, 30))  # 290-319
    cells.remove(0)
    cells.remove(3)
    assert _repack(cells, [4, 2], staying=[1]) == [(-1, 0), (1, 40)]
