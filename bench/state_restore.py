"""Restoring a conversation's state from the host and disk tiers against recomputing it, in one run, in-process.

A 2,000-token conversation history (a report of about 1,500 tokens and a few turns, through the model's own chat
template) on the embedded SmolLM2 model, with the worker's llama.cpp engine and settings. Each round brings an
empty resident sequence (a conversation's cells in the worker's shared KV cache) to holding that history, four ways,
side by side:

    (a) recompute: prefill the 2,000 tokens (what a turn costs when its state was lost);
    (b) host tier: take the saved state from host memory and import it into the context;
    (c) disk tier: take it from the disk tier (the file was just written, so it is read from the page cache);
    (d) disk tier, cold: the same after the file was flushed and dropped from the page cache, so it is read from
        the device.

Each restore is checked: the next turn's first greedy tokens must equal those after the recompute. Saving (the
export and the write to disk) happens when a state leaves the resident contexts, not on its own next turn; its
time is printed apart. Goal: (c) and (d) at least 10x faster than (a).

    .venv/bin/python -m bench.state_restore [--rounds 5] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from services.chat.domain import Sampling
from services.chat.engines.base import EngineRun, TokenSample
from services.chat.engines.llama_context import KvSequence
from services.chat.engines.llama_cpp import LlamaCppEngine
from services.chat.state_store import ConversationStore, Tier
from services.common.config import Capability, load_config
from services.common.cpu import WORKERS_ON_HOST_ENV

QUESTIONS = [
    "Which division grew the fastest last year, and why, according to the report?",
    "What does the report say about the risks facing the northern warehouses?",
    "Who is responsible for logistics, and what did they change recently?",
    "List the three most important recommendations, each in a few words.",
]


def report() -> str:
    paragraphs = [
        f"Section {i + 1}. The river ferries division reported that quarter {i % 4 + 1} revenue rose by {3 + i % 7} "
        f"percent, driven by new routes, longer opening hours and a loyalty scheme launched in spring. Manager "
        f"number {i + 1} noted that staffing at the northern warehouses remained a concern, while the logistics "
        f"team under Director Alvarez replaced the old scheduling software with a simpler system."
        for i in range(26)
    ]
    return "\n\n".join(paragraphs)


def history_tokens(engine: LlamaCppEngine, n_tokens: int) -> tuple[list[int], list[int]]:
    """A conversation of exactly `n_tokens` tokens, and the tokens of the next user turn."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant that answers questions about reports."},
        {"role": "user", "content": f"Here is a report:\n\n{report()}\n\n{QUESTIONS[0]}"},
    ]
    for question in QUESTIONS[1:]:
        messages += [
            {"role": "assistant", "content": "The report says the river ferries division grew the fastest."},
            {"role": "user", "content": question},
        ]
    tokens = engine.encode_prompt(messages)
    if len(tokens) < n_tokens + 40:
        raise SystemExit(f"the conversation has only {len(tokens)} tokens; ask for fewer")
    return tokens[:n_tokens], tokens[n_tokens : n_tokens + 40]


def greedy(engine: LlamaCppEngine, seq: KvSequence, tokens: list[int], limit: int) -> list[int]:
    """The first greedy tokens after `tokens`, continuing what the sequence holds."""

    async def run() -> list[int]:
        job = EngineRun(prompt=tokens, sampling=Sampling(temperature=0.0), max_new_tokens=limit, context=seq)
        return [e.token async for e in engine.run(job) if isinstance(e, TokenSample) and not engine.is_eog(e.token)]

    return asyncio.run(run())


def hold(engine: LlamaCppEngine, seq: KvSequence, history: list[int]) -> None:
    """Bring the sequence to exactly the history: prefill it (one token sampled, not evaluated)."""
    greedy(engine, seq, history, 1)


def drop_from_page_cache(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name.startswith("."):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # written pages must be clean before they can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2000, help="length of the history")
    args = parser.parse_args()

    config = load_config()
    model = config.models_for(Capability.CHAT)[0]
    # The engine of a chat worker under `ark up` (threads: its share of this machine's cores).
    os.environ[WORKERS_ON_HOST_ENV] = str(len(config.services.chat.workers))
    engine = LlamaCppEngine(model)
    seq = engine.new_context()
    history, turn = history_tokens(engine, args.tokens)
    print(f"{model.id}, {model.settings}: a history of {len(history)} tokens, {args.rounds} rounds")

    hold(engine, seq, history)
    state = engine.export_state(seq)
    expected = greedy(engine, seq, [*history, *turn], 8)
    print(f"state: {len(state) / 1e6:.1f} MB ({len(state) / len(history) / 1024:.1f} KiB per token)")

    times: dict[str, list[float]] = {"recompute": [], "host": [], "disk": [], "disk, cold": []}
    saving: dict[str, list[float]] = {"export": [], "write": []}
    answers_agree = True
    with tempfile.TemporaryDirectory(prefix="ark-bench-") as scratch:
        host = ConversationStore(engine, host_bytes=len(state) * 2, model="bench", contexts=0)
        disk = ConversationStore(engine, disk_bytes=len(state) * 2, disk_dir=scratch, model="bench", contexts=0)

        def save(tiers: ConversationStore, tier: Tier, cold: bool = False) -> Callable[[], None]:
            """Save the sequence's state (the history) to `tier`; returns the restore to time."""
            hold(engine, seq, history)
            t0 = time.perf_counter()
            blob = engine.export_state(seq)
            t1 = time.perf_counter()
            entry = tiers.put(api_key_hash="k", session_id="s", conversation_key="c", tokens=history, blob=blob)
            t2 = time.perf_counter()
            assert entry is not None and tiers.tier_of(entry.entry_id) is tier
            if tier is Tier.DISK and not cold:
                saving["export"].append(t1 - t0)
                saving["write"].append(t2 - t1)
            if cold:
                assert tiers.directory is not None
                drop_from_page_cache(tiers.directory)
            return lambda: _restore(tiers, entry.entry_id, tier)

        def _restore(tiers: ConversationStore, entry_id: str, tier: Tier) -> None:
            assert tiers.restore(entry_id, lambda blob: engine.import_state(seq, blob, history)) is tier

        sides: dict[str, Callable[[], Callable[[], None]]] = {
            "recompute": lambda: lambda: hold(engine, seq, history),
            "host": lambda: save(host, Tier.HOST),
            "disk": lambda: save(disk, Tier.DISK),
            "disk, cold": lambda: save(disk, Tier.DISK, cold=True),
        }
        for round_ in range(args.rounds):
            for name, prepare in sides.items():
                run = prepare()
                engine.reset_context(seq)
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                answers_agree &= greedy(engine, seq, [*history, *turn], 8) == expected
            print(f"round {round_ + 1}: " + "  ".join(f"{n} {t[-1] * 1000:.1f} ms" for n, t in times.items()))
        host.close()
        disk.close()
    asyncio.run(engine.close())

    base = statistics.median(times["recompute"])
    print(f"\nbringing an empty context to a {len(history)}-token history (median of {args.rounds} rounds)")
    print(f"{'side':<28} {'median ms':>10} {'vs recompute':>13}")
    labels = {
        "recompute": "(a) recompute (prefill)",
        "host": "(b) host tier",
        "disk": "(c) disk tier (page cache)",
        "disk, cold": "(d) disk tier, cold read",
    }
    for name, label in labels.items():
        median = statistics.median(times[name])
        print(f"{label:<28} {median * 1000:10.1f} {base / median:12.1f}x")
    print(
        f"saving, when a state leaves its context: export {statistics.median(saving['export']) * 1000:.1f} ms, "
        f"write to disk {statistics.median(saving['write']) * 1000:.1f} ms"
    )
    print(f"next turn's greedy tokens equal after every restore: {'yes' if answers_agree else 'NO'}")
    worst = min(base / statistics.median(times[n]) for n in ("disk", "disk, cold"))
    print(f"disk restore is {worst:.1f}x faster than recomputing (goal >= 10x): {'met' if worst >= 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
