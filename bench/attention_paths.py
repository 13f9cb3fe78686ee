"""Where llama.cpp's CPU attention changes path, measured in-process on the chat model, one thread.

ggml's CPU flash attention computes a batch of 64 query rows or more in tiles of 64 rows, each tile against every
64 cells any of its rows attends to, and a smaller batch row by row, skipping the cells a row does not attend to.
Two consequences the llama.cpp engine acts on (services/chat/engines/llama_context.py):

1. A short turn on a long conversation (`_widen`): N new tokens after a history of H tokens, one sequence. Below 64
   rows each row walks the whole history; at 64 the tiles are several times cheaper per cell.
2. A step mixing sequences (`_passes`): 16 sequences of L tokens each decoding their next token, plus P prompt rows
   of another sequence. From 64 rows the tile holding the 16 sequences' rows is computed against all their cells.
3. Idle cells (`_keep_idle_budget`): 8 sequences decoding their next token beside I cells of an idle one. A row
   pays for every cell up to the highest in use, those it does not attend to included.

    .venv/bin/python -m bench.attention_paths
"""

from __future__ import annotations

import statistics
import time

import llama_cpp
from llama_cpp._utils import suppress_stdout_stderr

from services.common.config import Capability, load_config, resolve_model_path

HISTORIES = (0, 500, 2100)
NEW = (16, 48, 63, 64, 70, 128)
SEQUENCES = 16
SEQUENCE_TOKENS = 200
PROMPT_ROWS = (0, 8, 32, 47, 48, 64, 100)
RUNNING = 8
RUNNING_TOKENS = 330
IDLE_CELLS = (0, 2000, 5000)


class Context:
    """One llama.cpp context with a unified KV cache (ARK's), or with `streams` sequences each in a KV stream of its
    own, `n_ctx` split evenly among them (llama-server's with `-np`), fed token batches directly."""

    def __init__(self, model: llama_cpp.llama_model_p, n_ctx: int, threads: int = 1, *, streams: int = 0) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 512, 512
        params.n_seq_max, params.kv_unified = (streams, False) if streams else (SEQUENCES + 2, True)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        with suppress_stdout_stderr(disable=False):  # llama.cpp prints its context's whole setup
            self.ctx = llama_cpp.llama_init_from_model(model, params)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(self, rows: list[tuple[int, int, int]], *, every_logit: bool = False) -> float:
        """Evaluate (token, position, sequence) rows in one llama_decode (logits for the last row, or for every row
        as a decoding step wants them); its seconds."""
        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (token, pos, seq) in enumerate(rows):
            wants = every_logit or i == len(rows) - 1
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, wants
            batch.seq_id[i][0] = seq
        start = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - start

    def forget(self, seq: int, from_pos: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, from_pos, -1)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        with suppress_stdout_stderr(disable=False):
            llama_cpp.llama_free(self.ctx)


def tokens(n: int, offset: int = 0) -> list[int]:
    return [100 + (i * 7 + offset) % 1000 for i in range(n)]


def short_turns(model: llama_cpp.llama_model_p) -> None:
    print("1. N new tokens after a history of H tokens, one sequence (median of 3)")
    print(f"{'history':>8} {'new':>5} {'ms':>8} {'ms/token':>9}")
    context = Context(model, 4096)
    try:
        for history in HISTORIES:
            context.forget(0, 0)
            for start in range(0, history, 512):
                context.decode([(t, start + i, 0) for i, t in enumerate(tokens(min(512, history - start), start))])
            for new in NEW:
                times = []
                for _ in range(3):
                    times.append(context.decode([(t, history + i, 0) for i, t in enumerate(tokens(new, 5))]))
                    context.forget(0, history)
                took = statistics.median(times)
                print(f"{history:>8} {new:>5} {took * 1000:>8.1f} {took / new * 1000:>9.2f}")
    finally:
        context.close()


def mixed_steps(model: llama_cpp.llama_model_p) -> None:
    print(f"\n2. {SEQUENCES} sequences of {SEQUENCE_TOKENS} tokens decoding + P prompt rows of another (median of 5)")
    print(f"{'prompt rows':>11} {'rows':>5} {'ms':>8}")
    context = Context(model, 8192)
    try:
        for seq in range(SEQUENCES):
            context.decode([(t, i, seq) for i, t in enumerate(tokens(32, seq))])
        for pos in range(32, SEQUENCE_TOKENS):  # decoded together, so their cells interleave as in a real batch
            context.decode([(200 + seq, pos, seq) for seq in range(SEQUENCES)])
        for prompt_rows in PROMPT_ROWS:
            times = []
            for _ in range(5):
                rows = [(300 + seq, SEQUENCE_TOKENS, seq) for seq in range(SEQUENCES)]
                rows += [(t, i, SEQUENCES) for i, t in enumerate(tokens(prompt_rows, 9))]
                times.append(context.decode(rows))
                context.forget(SEQUENCES, 0)
                for seq in range(SEQUENCES):
                    context.forget(seq, SEQUENCE_TOKENS)
            print(f"{prompt_rows:>11} {SEQUENCES + prompt_rows:>5} {statistics.median(times) * 1000:>8.1f}")
    finally:
        context.close()


def idle_cells(model: llama_cpp.llama_model_p) -> None:
    print(f"\n3. {RUNNING} sequences of {RUNNING_TOKENS} tokens decoding beside I idle cells (median of 16)")
    print(f"{'idle cells':>10} {'ms/row':>7}")
    for idle in IDLE_CELLS:
        context = Context(model, 16384)
        try:
            for start in range(0, idle, 512):  # the idle sequence's cells first: below the running ones
                context.decode([(t, start + i, SEQUENCES) for i, t in enumerate(tokens(min(512, idle - start), 3))])
            for seq in range(RUNNING):
                context.decode([(t, i, seq) for i, t in enumerate(tokens(RUNNING_TOKENS, seq))])
            times = []
            for step in range(16):
                rows = [(300 + seq, RUNNING_TOKENS + step, seq) for seq in range(RUNNING)]
                times.append(context.decode(rows, every_logit=True))
            print(f"{idle:>10} {statistics.median(times) / RUNNING * 1000:>7.2f}")
        finally:
            context.close()


def load_chat_model() -> llama_cpp.llama_model_p:
    """The configured chat model's GGUF, loaded for llama.cpp's low-level API (free it with llama_model_free)."""
    path = resolve_model_path(load_config(env={}).models_for(Capability.CHAT)[0].path)
    llama_cpp.llama_backend_init()
    with suppress_stdout_stderr(disable=False):  # and the GGUF file's whole header
        return llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())


def main() -> None:
    model = load_chat_model()
    try:
        short_turns(model)
        mixed_steps(model)
        idle_cells(model)
    finally:
        llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
