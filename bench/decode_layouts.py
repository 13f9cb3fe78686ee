"""Raw decode tokens/s of the ways two cores can decode many sequences, in-process on the chat model: what the
layouts cost before any server is involved.

- ARK's default: two workers, one thread each, 4 sequences each (8 streams), measured alone and as two processes
  decoding at once (they share the memory bus and the last-level cache: does each slow the other?);
- llama-server's: one process, two threads, 8 sequences in one batch, each sequence in a KV stream of its own as
  `-np` gives its slots (2,048 cells each here, as the batching benchmark starts it), and the same with ARK's
  unified cache, which separates what the threads cost from what the streams save;
- one sequence on one thread, the single-stream reference.

Each decodes 100 steps of one token per sequence after a 40-token prompt each.

    .venv/bin/python -m bench.decode_layouts
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import llama_cpp

from bench.attention_paths import Context, load_chat_model

PROMPT = 40
STEPS = 100


def decode_rate(
    sequences: int, threads: int, ready: Callable[[], None] = lambda: None, *, streams: bool = False
) -> float:
    """Tokens/s of `sequences` sequences decoding together on `threads` threads, in one unified KV cache or (with
    `streams`) in a stream each; `ready` is called once they are prefilled, and returns when the timed loop may
    start."""
    model = load_chat_model()
    context = Context(model, sequences * 2048, threads, streams=sequences) if streams else Context(model, 4096, threads)
    try:
        context.decode([(1000 + seq + i, i, seq) for seq in range(sequences) for i in range(PROMPT)])
        ready()
        began = time.perf_counter()
        for step in range(STEPS):
            context.decode([(1000 + seq, PROMPT + step, seq) for seq in range(sequences)], every_logit=True)
        return sequences * STEPS / (time.perf_counter() - began)
    finally:
        context.close()
        llama_cpp.llama_model_free(model)


def _twin(sequences: int, both: Any, out: Any) -> None:
    out.put(decode_rate(sequences, 1, both.wait))


def twins(sequences: int) -> tuple[float, float]:
    """Two processes of one thread each, decoding at once (ARK's two workers): each starts its timed loop once both
    are loaded and prefilled."""
    both, out = multiprocessing.Barrier(2), multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_twin, args=(sequences, both, out)) for _ in range(2)]
    for worker in workers:
        worker.start()
    rates = (out.get(), out.get())
    for worker in workers:
        worker.join()
    return rates


def main() -> None:
    one = decode_rate(1, 1)
    alone = decode_rate(4, 1)
    a, b = twins(4)
    shared = decode_rate(8, 2)
    server = decode_rate(8, 2, streams=True)
    print("raw decode, tokens/s (in-process, no server)")
    print(f"  1 sequence, 1 thread:                              {one:7.1f}")
    print(f"  4 sequences, 1 thread, alone:                      {alone:7.1f}")
    print(f"  4 sequences, 1 thread, two processes at once:      {a:7.1f} + {b:7.1f} = {a + b:7.1f}")
    print(f"  8 sequences, 2 threads, one process, unified cache: {shared:7.1f}")
    print(f"  8 sequences, 2 threads, one process, a KV stream each (llama-server): {server:7.1f}")
    print(f"two one-thread workers / one two-thread process, both unified: {(a + b) / shared:.2f}x")
    print(f"two one-thread workers (ARK) / llama-server's layout: {(a + b) / server:.2f}x")


if __name__ == "__main__":
    main()
