"""Embeddings throughput through ARK versus sentence-transformers in-process, side by side in one run.

The same 32 single sentences, three ways, interleaved round by round so that machine noise hits all alike:
  in-process batched   SentenceTransformer.encode(32 sentences) in this process (its default batch size, 32),
                       with torch on 1 and on 2 threads; the faster of the two is the reference;
  ARK, concurrent      32 concurrent single-sentence POST /v1/embeddings through the whole stack (HTTP → edge →
                       gRPC → embeddings service), which the service's dynamic batching merges into shared batches;
                       32 users, each with its own httpx.AsyncClient, as 32 independent callers would be;
  ARK, sequential      the same 32 requests one at a time from one client, i.e. nothing for batching to merge;
  ARK, continuous      the 32 users for CONTINUOUS_SECONDS, each sending its next request as soon as its last is
                       answered: throughput under steady load, where requests arrive and leave while the model runs
                       (its ms per 32 is the mean time per 32 sentences).
Requests ask for `encoding_format: base64`, as the official Python client does by default. The clients, the edge
and the service share the machine's cores. One client per user matters on a small machine: one AsyncClient shared
by 32 requests in flight spends about 2.7 ms of CPU per request in its connection pool, 32 clients about 0.6 ms
(measured here), and that CPU is taken from the server. Reports the median throughput of each and the ratio the
embeddings issue sets a goal for:
    ARK concurrent >= 0.8x in-process batched.

    .venv/bin/python -m bench.embeddings_throughput [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from services.common.config import Capability, load_config, resolve_model_path
from tests.support.stack import start_stack

SUBJECTS = ["The old lighthouse keeper", "A small robot", "Our neighbour's cat", "The city council", "A violinist"]
ACTIONS = [
    "watched the storm roll in",
    "repaired the broken clock in the square",
    "argued about the budget for the new library until well after midnight",
    "found a map",
    "planted tomatoes along the river bank where the ferry used to stop every morning",
    "sang quietly",
    "wrote a long letter to an old friend who had moved abroad",
]
CODAS = ["", " yesterday", " before the winter festival began", " while everyone else was asleep"]


def sentences(n: int = 32) -> list[str]:
    """n distinct single sentences of varied length (about 6 to 30 tokens), as real traffic has."""
    return [
        f"{SUBJECTS[i % len(SUBJECTS)]} {ACTIONS[(i * 3) % len(ACTIONS)]}{CODAS[(i // 2) % len(CODAS)]} (#{i})."
        for i in range(n)
    ]


# Pause before each measurement: idle threads of the side measured last (torch's OpenMP workers busy-wait for a while
# after a forward pass) must not take cores from the side measured next.
SETTLE_SECONDS = 0.2
IN_PROCESS = {1: "in-process, 1 thread", 2: "in-process, 2 threads"}
CONCURRENT, SEQUENTIAL, CONTINUOUS = "ARK, 32 concurrent", "ARK, sequential", "ARK, continuous"
CONTINUOUS_SECONDS = 2.0


def in_process_batched(model: SentenceTransformer, texts: list[str], threads: int) -> float:
    torch.set_num_threads(threads)
    model.encode(texts[:2])  # settle the thread pool after a change of size
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    return time.perf_counter() - start


async def post(http: httpx.AsyncClient, text: str) -> np.ndarray:
    body = {"model": "text-embedding-3-small", "input": text, "encoding_format": "base64"}
    response = await http.post("/embeddings", json=body)
    response.raise_for_status()
    return np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")


async def ark_concurrent(users: list[httpx.AsyncClient], texts: list[str]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(post(http, t) for http, t in zip(users, texts, strict=True)))
    return time.perf_counter() - start


async def ark_sequential(http: httpx.AsyncClient, texts: list[str]) -> float:
    start = time.perf_counter()
    for t in texts:
        await post(http, t)
    return time.perf_counter() - start


async def ark_continuous(users: list[httpx.AsyncClient], texts: list[str], seconds: float) -> float:
    """Seconds per len(texts) sentences while every user keeps one request in flight for `seconds`."""
    stop = time.perf_counter() + seconds
    answered = 0

    async def user(http: httpx.AsyncClient, text: str) -> None:
        nonlocal answered
        while time.perf_counter() < stop:
            await post(http, text)
            answered += 1

    start = time.perf_counter()
    await asyncio.gather(*(user(http, t) for http, t in zip(users, texts, strict=True)))
    return (time.perf_counter() - start) / answered * len(texts)


async def run(base_url: str, key: str, model: SentenceTransformer, rounds: int) -> dict[str, list[float]]:
    texts = sentences()
    headers = {"authorization": f"Bearer {key}"}
    async with contextlib.AsyncExitStack() as stack:
        users = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120))
            for _ in texts
        ]
        # Warm-up (every user's connection), and a check that ARK returns what the model computes.
        reference = model.encode(texts, batch_size=32)
        served = await asyncio.gather(*(post(http, t) for http, t in zip(users, texts, strict=True)))
        worst = min(float(a @ b) for a, b in zip(served, reference, strict=True))
        assert worst > 0.9999, f"ARK's vectors differ from sentence-transformers' (cosine {worst})"
        await ark_sequential(users[0], texts[:4])
        sides = [*IN_PROCESS.values(), CONCURRENT, SEQUENTIAL, CONTINUOUS]
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(rounds):
            for threads, name in IN_PROCESS.items():
                await asyncio.sleep(SETTLE_SECONDS)
                seconds[name].append(in_process_batched(model, texts, threads))
            await asyncio.sleep(SETTLE_SECONDS)
            seconds[CONCURRENT].append(await ark_concurrent(users, texts))
            await asyncio.sleep(SETTLE_SECONDS)
            seconds[SEQUENTIAL].append(await ark_sequential(users[0], texts))
            await asyncio.sleep(SETTLE_SECONDS)
            seconds[CONTINUOUS].append(await ark_continuous(users, texts, CONTINUOUS_SECONDS))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    config = load_config(env={}).models_for(Capability.EMBEDDINGS)[0]
    model = SentenceTransformer(str(resolve_model_path(config.path)), device="cpu", local_files_only=True)
    stack = start_stack(Path(tempfile.mkdtemp(prefix="ark-bench-")))
    try:
        seconds = asyncio.run(run(stack.base_url, stack.api_key, model, args.rounds))
    finally:
        stack.stop()

    n = len(sentences())
    rate = {side: n / statistics.median(values) for side, values in seconds.items()}
    reference = max(IN_PROCESS.values(), key=rate.__getitem__)
    print(f"\nEmbeddings throughput, {config.id}, {n} single sentences, {args.rounds} rounds (median)")
    print(f"{'':22} {'ms per 32':>10} {'sentences/s':>12}")
    for side, values in seconds.items():
        print(f"{side:22} {statistics.median(values) * 1000:10.1f} {rate[side]:12.1f}")
    concurrent = rate[CONCURRENT]
    print(f"\nARK concurrent / in-process batched ({reference}): {concurrent / rate[reference]:.2f}x   (goal >= 0.8x)")
    print(f"ARK concurrent / ARK sequential: {concurrent / rate[SEQUENTIAL]:.2f}x   (what batching buys)")
    print(f"ARK continuous / in-process batched: {rate[CONTINUOUS] / rate[reference]:.2f}x   (steady load)")


if __name__ == "__main__":
    main()
