"""A multi-turn load: 16 users with sessions arriving at random, ARK against llama.cpp's `llama-server` with its slot
and host prompt caches on, in one run, same GGUF, same cores.

Each user arrives after an exponentially distributed pause (Poisson arrivals, a mean of `--gap` seconds), opens
with a ~1,500-token document and a question, then asks 5 short questions, each after the previous answer (up to 48
tokens each). ARK's users are official-client-like: each keeps its session cookie, so its worker continues the
conversation's state; llama-server (`-np 16`, `--cache-ram`) reuses a slot's cells or its host prompt cache when a
prompt extends one it has seen. Reported per side: completion tokens per second over the run, TTFT p50 and p95 of
every turn and of the later turns alone, and the prompt tokens reused (cached_tokens) against all prompt tokens.

    make llama-server
    .venv/bin/python -m bench.batching_sessions --llama-server .cache/llama-server/build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.batching import stream
from services.common.config import Capability, load_config, resolve_model_path
from tests.support.stack import free_port, start_stack

USERS = 16
TURNS = 5
QUESTIONS = [
    "Which division grew the fastest, and why?",
    "What are the risks at the northern piers?",
    "Who runs logistics, and what changed?",
    "What were the satisfaction scores?",
    "List the three main recommendations.",
]


def document(user: int) -> str:
    """About 1,500 tokens of report-like prose, different for each user."""
    return "\n\n".join(
        f"Section {i + 1}. The division of user {user} reported that quarter {i % 4 + 1} revenue rose by "
        f"{(3 + i + user) % 9 + 1} percent, driven by new routes, longer opening hours and a loyalty scheme. "
        f"Manager number {i + 1} noted that staffing at the northern piers remained a concern, while the logistics "
        f"team replaced the old scheduling software with a simpler system."
        for i in range(24)
    )


async def user(index: int, url: str, key: str, model: str, delay: float, stats: dict) -> None:
    await asyncio.sleep(delay)
    messages = [{"role": "user", "content": f"{document(index)}\n\nSummarise the report in two sentences."}]
    async with httpx.AsyncClient(timeout=600) as client:  # keeps its cookies: ARK's session
        for turn in range(TURNS + 1):
            body = {"model": model, "messages": messages, "max_tokens": 48, "temperature": 0.0}
            try:
                result = await stream(client, url, key, body, details=True)
            except httpx.HTTPError:  # the server dropped the connection: counted, and this user stops
                stats["failed"] += 1
                return
            if result is None:
                stats["refused"] += 1
                return
            ttft, tokens, text, prompt, cached = result
            stats["ttft"].append((turn, ttft))
            stats["tokens"] += tokens
            stats["prompt"] += prompt
            stats["cached"] += cached
            if turn < TURNS:
                messages = [
                    *messages,
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": QUESTIONS[turn]},
                ]


def play(url: str, key: str, model: str, gap: float, seed: int) -> dict:
    rng = random.Random(seed)
    delays, at = [], 0.0
    for _ in range(USERS):
        at += rng.expovariate(1 / gap)
        delays.append(at)
    stats: dict = {"ttft": [], "tokens": 0, "prompt": 0, "cached": 0, "refused": 0, "failed": 0}

    async def run() -> None:
        await asyncio.gather(*(user(i, url, key, model, delays[i], stats) for i in range(USERS)))

    start = time.perf_counter()
    asyncio.run(run())
    stats["seconds"] = time.perf_counter() - start
    return stats


def summary(name: str, stats: dict) -> str:
    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")

    every = [t for _, t in stats["ttft"]]
    later = [t for turn, t in stats["ttft"] if turn]
    return (
        f"{name:<22} {stats['tokens'] / stats['seconds']:7.1f} tok/s  TTFT p50 {statistics.median(every):5.2f} s "
        f"p95 {pct(every, 95):5.2f} s  later turns p50 {statistics.median(later):5.2f} s p95 {pct(later, 95):5.2f} s  "
        f"reused {stats['cached']}/{stats['prompt']} prompt tokens ({stats['cached'] / max(1, stats['prompt']):.0%})"
        f"  refused {stats['refused']}  failed {stats['failed']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True, help="the binary `make llama-server` builds")
    parser.add_argument("--gap", type=float, default=2.0, help="mean seconds between two users' arrivals")
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    model = load_config(env={}).models_for(Capability.CHAT)[0]
    gguf = resolve_model_path(model.path)
    tmp = Path(tempfile.mkdtemp(prefix="ark-bench-batching-sessions-"))

    stack = start_stack(tmp / "ark")
    try:
        ark = play(f"{stack.base_url}/chat/completions", stack.api_key, "gpt-4o", args.gap, args.seed)
        print(summary("ARK (sessions)", ark), flush=True)
    finally:
        stack.stop()
    port = free_port()
    threads = str(len(os.sched_getaffinity(0)))
    command = [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(USERS)]
    command += ["-c", str(USERS * 4096), "-t", threads, "-tb", threads, "--cont-batching", "--cache-ram", "2048"]
    server = subprocess.Popen(command, stdout=(tmp / "llama-server.log").open("w"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start; see {tmp / 'llama-server.log'}")
            time.sleep(0.5)
        other = play(f"{base}/v1/chat/completions", "none", "any", args.gap, args.seed)
    finally:
        server.terminate()
        server.wait(30)
    print(f"\n{USERS} users, Poisson arrivals (mean gap {args.gap:g} s), a ~1,500-token opening then {TURNS} turns")
    print(summary("ARK (sessions)", ark))
    print(summary("llama-server -np 16", other))
    print(f"tokens/s ARK / llama-server: {ark['tokens'] / ark['seconds'] / (other['tokens'] / other['seconds']):.2f}x")


if __name__ == "__main__":
    main()
