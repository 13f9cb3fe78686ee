"""The conversation store's index and tiers with small blobs: the cascade and its fair share, supersession, the disk
tier's files and failures, metrics, and resident states saved when the engine needs their cells (a fake engine
whose contexts are token lists, below the engine line)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.chat.domain import Message, Role
from services.chat.state_store import MIN_SHARED_TOKENS, ConversationStore, Tier
from services.common.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from tests.support.fake_engine import FakeEngine

KEY, OTHER = "a" * 32, "b" * 32


class SavingEngine(FakeEngine):
    """Contexts whose exported state is their token list."""

    def export_state(self, context) -> bytes:
        return bytes(t % 256 for t in context.tokens)

    def import_state(self, context, data: bytes, tokens) -> bool:
        context.tokens = list(tokens)
        return True


def make(tmp_path: Path, host: int = 300, disk: int = 1000, share: float = 1.0, engine=None) -> ConversationStore:
    model = f"test-{uuid.uuid4().hex[:8]}"  # metrics of this store only
    return ConversationStore(
        engine or SavingEngine(),
        host_bytes=host,
        disk_bytes=disk,
        key_share=share,
        disk_dir=tmp_path / "states",
        model=model,
    )


def put(store: ConversationStore, tokens, size: int = 100, key: str = KEY, session: str = "s1", conversation: str = ""):
    blob = bytes([len(tokens) % 256]) * size
    return store.put(api_key_hash=key, session_id=session, conversation_key=conversation, tokens=tokens, blob=blob)


def files(store: ConversationStore) -> list[Path]:
    assert store.directory is not None
    return [p for p in store.directory.iterdir() if not p.name.startswith(".")]


def sample(name: str, store: ConversationStore, tier: Tier) -> float:
    return REGISTRY.get_sample_value(name, {"model": store._model, "tier": tier}) or 0.0


def test_host_tier_keeps_states_in_memory_until_full_then_spills_the_least_recent_to_disk(tmp_path):
    with make(tmp_path) as store:
        a, b, c = put(store, [1]), put(store, [2]), put(store, [3])
        assert [store.tier_of(e.entry_id) for e in (a, b, c)] == [Tier.HOST] * 3
        assert files(store) == []
        d = put(store, [4])
        assert store.tier_of(a.entry_id) is Tier.DISK, "the least recently stored state moves down"
        assert {store.tier_of(e.entry_id) for e in (b, c, d)} == {Tier.HOST}
        assert len(files(store)) == 1
        assert store.used_bytes(Tier.HOST) == 300 and store.used_bytes(Tier.DISK) == 100
        assert sample("ark_chat_state_tier_evictions_total", store, Tier.HOST) == 1
        assert sample("ark_chat_state_tier_bytes", store, Tier.DISK) == 100


def test_full_disk_deletes_its_least_recent_state_and_a_lost_state_is_simply_not_found(tmp_path):
    with make(tmp_path, host=100, disk=200) as store:
        a, b, c, d = (put(store, [i, i]) for i in range(1, 5))
        assert store.tier_of(a.entry_id) is None, "pushed out of the last tier"
        assert [store.tier_of(e.entry_id) for e in (b, c, d)] == [Tier.DISK, Tier.DISK, Tier.HOST]
        assert len(files(store)) == 2
        assert store.take(a.entry_id) is None
        assert store.best_match(KEY, [1, 1]) is None
        assert sample("ark_chat_state_tier_evictions_total", store, Tier.DISK) == 1


def test_a_state_larger_than_the_host_tier_goes_to_disk_and_one_larger_than_every_tier_is_not_kept(tmp_path):
    with make(tmp_path, host=100, disk=300) as store:
        big = put(store, [1], size=250)
        assert store.tier_of(big.entry_id) is Tier.DISK
        assert put(store, [2], size=301) is None
        assert len(store) == 1


def test_take_returns_the_blob_and_its_tier_and_removes_it(tmp_path):
    with make(tmp_path, host=100) as store:
        old = store.put(api_key_hash=KEY, session_id="s", conversation_key="", tokens=[1], blob=b"x" * 100)
        new = store.put(api_key_hash=KEY, session_id="s", conversation_key="", tokens=[2], blob=b"y" * 100)
        assert store.take(new.entry_id) == (Tier.HOST, b"y" * 100)
        assert store.take(old.entry_id) == (Tier.DISK, b"x" * 100)
        assert files(store) == [], "a state taken from disk leaves no file behind"
        assert store.take(old.entry_id) is None and len(store) == 0
        assert sample("ark_chat_state_tier_hits_total", store, Tier.DISK) == 1
        assert sample("ark_chat_state_tier_hits_total", store, Tier.HOST) == 1
        exported = bytearray(b"z" * 50)  # what llama.cpp's export gives: kept as it is, not copied
        kept = store.put(api_key_hash=KEY, session_id="s", conversation_key="", tokens=[3], blob=exported)
        tier, blob = store.take(kept.entry_id)
        assert tier is Tier.HOST and blob is exported


def test_restore_loads_the_blob_and_records_latency_by_tier(tmp_path):
    with make(tmp_path, host=0) as store:
        entry = put(store, [1, 2], size=10)
        loaded: list[bytes] = []
        assert store.restore(entry.entry_id, loaded.append) is Tier.DISK
        assert loaded == [bytes([2]) * 10]
        count = REGISTRY.get_sample_value(
            "ark_chat_state_restore_seconds_count", {"model": store._model, "tier": "disk"}
        )
        assert count == 1
        assert store.restore(entry.entry_id, loaded.append) is None, "already taken"


def test_a_failed_load_is_a_miss_not_an_error(tmp_path):
    def broken(blob: bytes) -> None:
        raise RuntimeError("state from another model")

    with make(tmp_path) as store:
        entry = put(store, [1])
        assert store.restore(entry.entry_id, broken) is None
        refused = put(store, [2])
        assert store.restore(refused.entry_id, lambda blob: False) is None
        assert len(store) == 0
        count = REGISTRY.get_sample_value(
            "ark_chat_state_restore_seconds_count", {"model": store._model, "tier": "host"}
        )
        assert not count, "a failed load is not a restore"


def test_a_vanished_or_unwritable_disk_costs_a_recompute_not_an_error(tmp_path):
    with make(tmp_path, host=100) as store:
        a = put(store, [1])
        put(store, [2])
        files(store)[0].unlink()
        assert store.take(a.entry_id) is None
        assert store.directory is not None
        shutil.rmtree(store.directory)  # writes now fail
        b = put(store, [3])
        assert store.tier_of(b.entry_id) is Tier.HOST
        assert store.best_match(KEY, [2]) is None, "the state that could not be written is gone"
        assert store.used_bytes(Tier.DISK) == 0


def test_a_key_over_its_share_pushes_out_its_own_states_first(tmp_path):
    with make(tmp_path, host=400, disk=400, share=0.5) as store:
        victim = [put(store, [i], key=KEY) for i in range(4)]  # 2 in host, 2 moved to disk by its own quota
        for i in range(30):
            put(store, [100 + i], key=OTHER)
        for i, entry in enumerate(victim):
            assert store.take(entry.entry_id) is not None, f"victim state {i} was lost to another key's flood"
        assert store.used_bytes(Tier.HOST, OTHER) <= 200 and store.used_bytes(Tier.DISK, OTHER) <= 200
        assert len(store.entries(OTHER)) == 4


def test_the_key_over_its_quota_pays_before_a_key_over_an_equal_split(tmp_path):
    third = "c" * 32
    with make(tmp_path, host=600, share=0.5) as store:
        heavy = [put(store, [1], size=150), put(store, [2], size=100)]  # 250: over a third of the tier, under half
        put(store, [3], size=50, key=OTHER)
        for i in range(6):
            put(store, [100 + i], key=third)
        assert [store.tier_of(e.entry_id) for e in heavy] == [Tier.HOST, Tier.HOST]
        assert store.used_bytes(Tier.HOST, third) == 300


def test_a_key_alone_may_use_the_whole_tier(tmp_path):
    with make(tmp_path, host=400, disk=400, share=0.25) as store:
        entries = [put(store, [i]) for i in range(8)]
        assert [store.tier_of(e.entry_id) for e in entries] == [Tier.DISK] * 4 + [Tier.HOST] * 4


def test_without_quota_a_full_tier_still_takes_from_the_key_holding_more_than_its_share(tmp_path):
    with make(tmp_path, host=400, disk=400, share=1.0) as store:
        victim = put(store, [1], key=KEY)  # the least recent state of all
        for i in range(20):
            put(store, [100 + i], key=OTHER)
        assert store.tier_of(victim.entry_id) is Tier.HOST, "the flooding key paid, not the oldest state"


P = list(range(100, 100 + MIN_SHARED_TOKENS + 8))  # a prefix long enough to be worth reusing for another state


def test_best_match_is_the_longest_common_prefix_within_one_key(tmp_path):
    with make(tmp_path, host=1000) as store:
        long = put(store, [*P, 1, 2, 3, 4], session="s1", conversation="c1")
        fork = put(store, [*P, 1, 2, 9], session="s2", conversation="c2")
        put(store, [*P, 1, 2, 3, 4, 5, 6], key=OTHER)
        assert store.best_match(KEY, [*P, 1, 2, 3, 4, 5]) == (long, len(P) + 4)
        assert store.best_match(KEY, [*P, 1, 2, 9, 9]) == (fork, len(P) + 3)
        edited = [*P, 1, 2, 3, 7]
        assert store.best_match(KEY, edited, "c1") == (long, len(P) + 3), "an edit: reuse up to the divergence"
        assert store.best_match(KEY, edited) is None, "another conversation's saved state is not taken for a part"
        assert store.best_match(KEY, [*P, 1, 2], "c1") == (long, len(P) + 2), "a longer state serves its prefix"
        assert store.best_match(KEY, [7, *P]) is None
        assert store.best_match("c" * 32, [*P, 1, 2, 3, 4]) is None, "never another key's state"


def test_a_few_tokens_in_common_are_a_match_only_for_the_same_conversation(tmp_path):
    with make(tmp_path, host=1000) as store:
        entry = put(store, [1, 2, 3, 4], conversation="c1")
        assert store.best_match(KEY, [1, 2, 3, 4, 5]) is None, "a few template tokens in common: recompute"
        assert store.best_match(KEY, [1, 2, 3, 4, 5], "c1") == (entry, 4)


async def test_an_equal_match_prefers_the_resident_state_then_the_conversation_key(tmp_path):
    with make(tmp_path, host=1000) as store:
        resident = await store.checkout(
            api_key_hash=KEY, session_id="s", conversation_key="", idle_timeout=0, messages=[Message(Role.USER, "hi")]
        )
        resident.context.tokens = [*P, 1]
        store.release(resident)
        saved = put(store, [*P, 1], conversation="c1")
        assert store.tier_of(resident.entry.entry_id) is Tier.RESIDENT, "saving never supersedes a resident state"
        assert store.best_match(KEY, [*P, 1, 5]) == (resident.entry, len(P) + 1)
        assert store.best_match(KEY, [*P, 1, 5], "c1") == (saved, len(P) + 1)


def test_a_longer_state_supersedes_its_prefixes_and_a_conversation_key_its_previous_state(tmp_path):
    with make(tmp_path, host=1000) as store:
        first = put(store, [1, 2, 3])
        kept = put(store, [1, 2, 3], key=OTHER)
        second = put(store, [1, 2, 3, 4, 5])
        assert store.tier_of(first.entry_id) is None and store.tier_of(kept.entry_id) is Tier.HOST
        named = put(store, [7, 8], conversation="c1")
        renamed = put(store, [9], conversation="c1")
        assert store.tier_of(named.entry_id) is None
        assert {e.entry_id for e in store.entries(KEY)} == {second.entry_id, renamed.entry_id}


def test_dropping_a_session_or_a_state_removes_it_from_every_tier(tmp_path):
    with make(tmp_path, host=200) as store:
        theirs = put(store, [9], session="theirs")
        mine = [put(store, [i], session="mine") for i in range(3)]
        assert store.tier_of(theirs.entry_id) is Tier.DISK
        assert {store.tier_of(e.entry_id) for e in mine} == {Tier.HOST, Tier.DISK}
        sessionless = put(store, [8], session="")
        assert store.drop_session("") == 0 and store.tier_of(sessionless.entry_id) is not None
        store.drop(sessionless.entry_id)
        assert store.drop_session("mine") == 3
        assert store.entries() == [theirs]
        assert len(files(store)) == 1
        assert store.drop(theirs.entry_id) and not store.drop(theirs.entry_id)
        assert files(store) == [] and store.used_bytes(Tier.HOST) == store.used_bytes(Tier.DISK) == 0


def test_files_are_private_and_opaquely_named(tmp_path):
    with make(tmp_path, host=0) as store:
        put(store, [1], session="../../etc/passwd", conversation="client-chosen-name")
        base = tmp_path / "states"
        assert stat.S_IMODE(base.stat().st_mode) == 0o700
        assert store.directory is not None and store.directory.parent == base
        assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
        (path,) = files(store)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert re.fullmatch(r"[0-9a-f]{32}", path.name)


def test_a_configured_directory_with_loose_permissions_is_made_private(tmp_path):
    base = tmp_path / "states"
    base.mkdir(mode=0o777)
    os.chmod(base, 0o777)
    with make(tmp_path):
        assert stat.S_IMODE(base.stat().st_mode) == 0o700


def test_start_removes_states_of_stopped_stores_but_not_of_running_ones_nor_other_files(tmp_path):
    base = tmp_path / "states"
    base.mkdir()
    stale = base / uuid.uuid4().hex
    stale.mkdir()
    (stale / "leftover").write_bytes(b"old state")
    unrelated = base / "notes.txt"
    unrelated.write_text("not ours")
    with make(tmp_path) as running:
        put(running, [1])
        assert not stale.exists()
        assert unrelated.exists()
        with make(tmp_path) as second:
            assert running.directory is not None and running.directory.exists(), "a live store is left alone"
            assert second.directory != running.directory
        own = running.directory
    assert not own.exists(), "close() deletes the store's directory"


def test_concurrent_use_keeps_the_accounting_right(tmp_path):
    with make(tmp_path, host=1000, disk=2000) as store:

        def work(worker: int) -> None:
            for i in range(200):
                entry = put(store, [worker, i], size=50 + i % 7, key=f"{worker % 3:032d}", session=f"s{worker}")
                if entry is not None and i % 3 == 0:
                    store.take(entry.entry_id)
                if i % 50 == 49:
                    store.drop_session(f"s{worker}")

        threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        entries = store.entries()
        assert store.used_bytes(Tier.HOST) + store.used_bytes(Tier.DISK) == sum(e.size for e in entries)
        assert store.used_bytes(Tier.HOST) <= 1000 and store.used_bytes(Tier.DISK) <= 2000
        assert len(files(store)) == sum(store.tier_of(e.entry_id) is Tier.DISK for e in entries)


def test_the_disk_tier_can_be_switched_off(tmp_path):
    store = ConversationStore(SavingEngine(), host_bytes=100, disk_bytes=0, key_share=1.0, disk_dir=tmp_path / "never")
    first = put(store, [1])
    put(store, [2])
    assert store.tier_of(first.entry_id) is None and store.directory is None
    assert not (tmp_path / "never").exists()
    store.close()


@pytest.mark.parametrize(
    "kwargs", [{"host_bytes": -1, "disk_bytes": 0}, {"host_bytes": 1, "disk_bytes": 1, "key_share": 0}]
)
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        ConversationStore(SavingEngine(), **kwargs)


@pytest.mark.parametrize(
    ("field", "value"), [("host_cache_mb", "-1"), ("disk_cache_mb", "lots"), ("key_share", "1.5"), ("disk_dir", "''")]
)
def test_bad_tier_settings_stop_start_up_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"sessions.{field}")):
        load_config(DEFAULT_CONFIG_PATH, env={f"ARK__SESSIONS__{field.upper()}": value})


def test_the_configuration_sizes_the_tiers(tmp_path):
    env = {"ARK__SESSIONS__HOST_CACHE_MB": "0.5", "ARK__SESSIONS__DISK_DIR": str(tmp_path / "d")}
    sessions = load_config(DEFAULT_CONFIG_PATH, env=env).sessions
    with ConversationStore.from_config(SavingEngine(), None, sessions) as store:
        assert store.directory is not None and store.directory.parent == tmp_path / "d"
        entry = put(store, [1], size=600_000)
        assert store.tier_of(entry.entry_id) is Tier.DISK, "larger than the 0.5 MB host tier"


def test_a_disk_dir_that_is_a_link_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "states").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match=r"sessions\.disk_dir"):
        make(tmp_path)


# -- resident states: the top of the cascade ------------------------------------------------------------------------


def user(text: str) -> list[Message]:
    return [Message(Role.USER, text)]


async def resident(store: ConversationStore, text: str, key: str = KEY, session: str = "s1"):
    """A turn checked out, run (its context made to hold its prompt) and released: a resident state."""
    checkout = await store.checkout(
        api_key_hash=key, session_id=session, conversation_key="", idle_timeout=60, messages=user(text)
    )
    checkout.context.tokens = list(checkout.tokens)
    store.complete(checkout, None)
    store.release(checkout)
    return checkout


async def test_when_the_engine_needs_cells_an_idle_resident_state_is_saved_to_host_not_dropped(tmp_path):
    with make(tmp_path, host=10_000) as store:
        first = await resident(store, "apples " * 10, session="a")
        second = await resident(store, "bricks " * 10, session="b")
        held = list(first.context.tokens)
        assert store.resident == 2 and len(store) == 0
        assert store.spill(), "the least recent resident state gave up its cells"
        assert store.tier_of(first.entry.entry_id) is Tier.HOST
        assert first.context.tokens == [], "its context was cleared"
        assert store.tier_of(second.entry.entry_id) is Tier.RESIDENT and second.context.tokens
        assert sample("ark_chat_state_tier_evictions_total", store, Tier.RESIDENT) == 1
        # Its next turn restores it into a context, from the host tier.
        turn = await store.checkout(
            api_key_hash=KEY, session_id="a", conversation_key="", idle_timeout=60, messages=user("apples " * 10)
        )
        assert turn.tier == "host" and turn.entry is first.entry and turn.context.tokens == held
        assert sample("ark_chat_state_tier_hits_total", store, Tier.HOST) == 1
        store.release(turn)


async def test_a_running_turn_or_an_empty_context_is_never_spilled(tmp_path):
    with make(tmp_path, host=10_000) as store:
        running = await store.checkout(
            api_key_hash=KEY, session_id="s", conversation_key="", idle_timeout=60, messages=user("apples " * 10)
        )
        running.context.tokens = list(running.tokens)
        empty = await store.checkout(
            api_key_hash=KEY, session_id="e", conversation_key="", idle_timeout=60, messages=user("bricks " * 10)
        )
        store.release(empty)
        assert not store.spill(), "nothing idle holds cells"
        assert running.context.tokens
        store.release(running)
        assert store.spill() and running.context.tokens == []


async def test_spilling_takes_from_the_key_over_its_share_first(tmp_path):
    engine = SavingEngine()
    engine.context_slots = 4
    with make(tmp_path, host=10_000, share=0.5, engine=engine) as store:
        victim = await resident(store, "victim " * 10, key=KEY, session="v")  # the least recent of all
        flood = [await resident(store, f"flood {i} " * 10, key=OTHER, session=f"f{i}") for i in range(3)]
        assert store.spill()
        assert store.tier_of(victim.entry.entry_id) is Tier.RESIDENT
        assert store.tier_of(flood[0].entry.entry_id) is Tier.HOST


async def test_resident_and_saved_states_expire_when_idle_and_a_session_drops_them_everywhere(tmp_path):
    now = [0.0]
    store = ConversationStore(
        SavingEngine(), host_bytes=10_000, disk_bytes=0, disk_dir=tmp_path / "never", clock=lambda: now[0]
    )
    kept = await resident(store, "apples " * 10, session="a")
    assert store.spill() and len(store) == 1
    await resident(store, "bricks " * 10, session="b")
    now[0] = 30
    await resident(store, "cement " * 10, session="c")
    now[0] = 61
    assert store.expire_idle() == 2, "the saved state of a and the resident state of b: idle past 60 s"
    assert store.tier_of(kept.entry.entry_id) is None and store.resident == 1
    assert store.drop_session("c") == 1 and store.resident == 0
    store.close()
