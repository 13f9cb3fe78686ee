"""Chat workers sharing a machine's cores: decode time alone and side by side, by threads per worker, in one run.

Each side starts P processes (1 or 2) of in-process llama-cpp-python on the chat model, each with T threads
(decode and prompt), and has them generate the same 200 greedy tokens starting at the same instant. On a machine
with C cores, P x T > C oversubscribes it: llama.cpp's threads spin while they wait for each other, so processes
whose threads outnumber the cores stall one another. This is what `n_threads: auto` (services/common/cpu.py)
avoids: each chat worker gets its share of the cores.

    .venv/bin/python -m bench.cpu_share [--tokens 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _child(start_at: float, threads: int, tokens: int) -> None:
    import llama_cpp

    from services.common.config import Capability, load_config, resolve_model_path

    model = load_config(env={}).models_for(Capability.CHAT)[0]
    llama = llama_cpp.Llama(
        model_path=str(resolve_model_path(model.path)),
        verbose=False,
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
    )
    messages = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper."}]
    while time.time() < start_at:
        time.sleep(0.001)
    started = time.perf_counter()
    llama.create_chat_completion(messages, temperature=0, max_tokens=tokens)
    print(time.perf_counter() - started, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--child", nargs=2, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.tokens)
        return
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; {args.tokens} greedy tokens per process, all processes starting together")
    print(f"{'processes':>9} {'threads each':>12} {'seconds each':>13} {'tokens/s together':>18}")
    alone: dict[int, float] = {}
    for threads in sorted({cores, 1}, reverse=True):
        for processes in (1, 2):
            start_at = time.time() + 8  # after every process has loaded the model
            children = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.cpu_share",
                        "--tokens",
                        str(args.tokens),
                        "--child",
                        str(start_at),
                        str(threads),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                for _ in range(processes)
            ]
            seconds = [float(child.communicate()[0].split()[-1]) for child in children]
            each = max(seconds)
            alone.setdefault(threads, each)
            print(
                f"{processes:>9} {threads:>12} {each:>13.2f} {processes * args.tokens / each:>18.1f}"
                + (f"   ({each / alone[threads]:.1f}x the time alone)" if processes > 1 else "")
            )


if __name__ == "__main__":
    main()
