"""Many users at once: ARK's default stack against llama.cpp's own `llama-server`, in one run, same GGUF, same cores.

N streams start at once, each with its own prompt, each asking for 128 tokens, N in 1, 4, 8, 16, 32; for each
side: tokens per second together (completion tokens of every stream over the wall time), time to first token
(median), and refusals (HTTP 429 or other errors). Sides:

    ARK: `ark up` with the default configuration (its chat workers decode their sequences in batched steps);
    llama-server -np 8 and -np 16: built by `make llama-server` from the sources vendored in the pinned
        llama-cpp-python, continuous batching on, every core of the machine (`-t` = the CPUs this process may use).

Then, on ARK only:
- a single stream against in-process llama-cpp-python with the same threads as one chat worker (decode tokens/s);
- 8 streams at once, half of them with a json_schema response format: every structured reply must parse and match;
- six users opening a ~1,200-token document at the same moment: none may be refused.

The three servers run side by side and each level runs on each of them in turn, `--rounds` times (3 by default),
so that the machine's drift lands on every side alike; the table has the medians.

Goals (issue 21): ARK's tokens/s >= llama-server's best from 8 streams on; TTFT p50 <= llama-server's at 8 and 16;
no refusal at 16 or in the burst; the single stream >= 0.95x in-process; every structured reply valid.

    make llama-server && .venv/bin/python -m bench.batching --llama-server .cache/llama-server/build/bin/llama-server

`--topology W,T,S` runs ARK alone on W chat workers x T threads x S sequences instead, to compare layouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.common.config import Capability, load_config, resolve_model_path
from services.common.cpu import WORKERS_ON_HOST_ENV
from tests.support.stack import free_port, start_stack

LEVELS = (1, 4, 8, 16, 32)
TOKENS = 128
SUBJECTS = [
    "a lighthouse keeper",
    "a travelling circus",
    "a lost robot",
    "a mountain village",
    "an old library",
    "a river ferry",
    "a desert caravan",
    "a space station",
    "a night market",
    "a fishing boat",
    "a clockmaker",
    "a snowy forest",
    "a jazz club",
    "a medieval castle",
    "a beekeeper",
    "a city tram",
    "a volcano island",
    "a ballet school",
    "a train conductor",
    "a coral reef",
    "a school garden",
    "a lunar base",
    "a tea plantation",
    "a street musician",
    "a polar expedition",
    "a bakery at dawn",
    "a chess club",
    "a carpenter's workshop",
    "a hot air balloon",
    "a wind farm",
    "a submarine crew",
    "an orchard in autumn",
]


@dataclass
class Level:
    tokens: int
    seconds: float
    ttfts: list[float]
    refused: int

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttfts) if self.ttfts else float("nan")


async def stream(client: httpx.AsyncClient, url: str, key: str, body: dict, *, details: bool = False) -> tuple | None:
    """One streamed completion: (time to first token, completion tokens, text), with `details` also the prompt
    tokens and the reused ones (cached_tokens; llama-server's `timings.cache_n`); None if refused, or if the stream
    ended with an error event (a request that failed is not a request served in no time)."""
    start = time.perf_counter()
    first = 0.0
    text: list[str] = []
    tokens = prompt = cached = 0
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=payload, headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            await response.aread()
            return None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None
            if usage := chunk.get("usage"):
                tokens, prompt = usage["completion_tokens"], usage["prompt_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            if timings := chunk.get("timings"):
                cached = cached or timings.get("cache_n", 0)
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter() - start
                    text.append(piece)
    return (first, tokens, "".join(text), prompt, cached) if details else (first, tokens, "".join(text))


def story(i: int, model: str) -> dict:
    subject = SUBJECTS[i % len(SUBJECTS)]
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a long, detailed story about {subject} (number {i})."}],
        "max_tokens": TOKENS,
        "temperature": 0.7,
    }


async def level(url: str, key: str, model: str, n: int, first: int = 0) -> Level:
    """N streams at once, the stories numbered from `first`: every level brings new users, with prompts no earlier
    level sent. A level that repeated an earlier level's prompts would send those to the worker holding that
    conversation (ARK continues a conversation where its state is, across sessions of one API key), and measure
    that affinity rather than batching: 4 streams went 3 to one worker and 1 to the other."""
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream(client, url, key, story(first + i, model)) for i in range(n)))
        seconds = time.perf_counter() - start
    done = [r for r in results if r is not None]
    return Level(sum(r[1] for r in done), seconds, [r[0] for r in done], len(results) - len(done))


def structured(url: str, key: str, model: str) -> tuple[int, int]:
    """8 streams at once, 4 with a json_schema: (valid structured replies, structured replies).

    The name and the age are bounded, so every structured reply completes within its 60 tokens: at temperature 0.7
    an unbounded string or integer sometimes ran on to the token limit, a reply cut by `length`, not an invalid one."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}

    async def run() -> list:
        async with httpx.AsyncClient(timeout=600) as client:
            bodies = [
                {**story(i, model), "response_format": fmt, "max_tokens": 60} if i % 2 else story(i, model)
                for i in range(8)
            ]
            for i in range(1, 8, 2):
                bodies[i]["messages"] = [{"role": "user", "content": f"Invent a person number {i} as JSON."}]
            return await asyncio.gather(*(stream(client, url, key, b) for b in bodies))

    results = asyncio.run(run())
    valid = 0
    for r in results[1::2]:
        try:
            value = json.loads(r[2]) if r else None
            valid += (
                isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("age"), int)
            )
        except json.JSONDecodeError:
            pass
    return valid, len(results[1::2])


def burst(url: str, key: str, model: str) -> int:
    """Six users each open a ~1,200-token document at once: how many were refused."""
    paragraph = (
        "The harbour authority reported that quarter {q} traffic rose by {p} percent, driven by new ferry routes, "
        "longer opening hours and a loyalty scheme; staffing at the northern piers remained a concern. "
    )

    async def run() -> list:
        async with httpx.AsyncClient(timeout=600) as client:
            bodies = []
            for u in range(6):
                doc = "".join(paragraph.format(q=i % 4 + 1, p=(u + i) % 9 + 1) for i in range(30))
                bodies.append(
                    {
                        "model": model,
                        "messages": [{"role": "user", "content": f"Document {u}:\n{doc}\nSummarise it briefly."}],
                        "max_tokens": 64,
                    }
                )
            return await asyncio.gather(*(stream(client, url, key, b) for b in bodies))

    return sum(1 for r in asyncio.run(run()) if r is None)


def in_process(gguf: Path, threads: int) -> float:
    """Decode tokens/s of one greedy generation in-process (llama-cpp-python), after the prompt."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llama.tokenize(b"Write a long, detailed story about a lighthouse keeper.", special=True)
    count, start = 0, 0.0
    for _ in llama.generate(prompt, temp=0.0):
        count += 1
        if count == 1:
            start = time.perf_counter()
        if count == TOKENS:
            break
    rate = (count - 1) / (time.perf_counter() - start)
    llama.close()
    return rate


def single_stream(url: str, key: str, model: str) -> float:
    """Decode tokens/s of one ARK stream: tokens after the first over the time after the first."""

    async def run() -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            start = time.perf_counter()
            result = await stream(client, url, key, {**story(0, model), "temperature": 0.0})
            assert result is not None
            ttft, tokens, _ = result
            return (tokens - 1) / (time.perf_counter() - start - ttft)

    return asyncio.run(run())


def start_llama_server(binary: str, gguf: Path, parallel: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    threads = len(os.sched_getaffinity(0))
    command = [binary, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-np", str(parallel)]
    command += ["-c", str(parallel * 2048), "-t", str(threads), "-tb", str(threads), "--cont-batching"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, f"{url}/v1/chat/completions"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"llama-server did not start; see {log}")


@dataclass(frozen=True)
class Side:
    name: str
    url: str
    key: str
    model: str


def rounds(sides: list[Side], count: int) -> dict[str, dict[int, list[Level]]]:
    """Every level on every side, `count` times, interleaved: each level runs on the three sides back to back, the
    order turning each round, with prompts no earlier level or round sent (every side gets the same ones).

    Run one side after another, a side measured a few minutes later met another machine: this shared machine's
    speed drifts by 10-20 % within minutes (llama-server's own best at 16 streams went from 186 to 216 tok/s
    between two runs an hour apart), and that drift landed on one side only. Interleaved and repeated, each level
    compares medians of runs made within the same minute."""
    out: dict[str, dict[int, list[Level]]] = {side.name: {n: [] for n in LEVELS} for side in sides}
    first = 0
    for r in range(count):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        for n in LEVELS:
            for side in order:
                result = asyncio.run(level(side.url, side.key, side.model, n, first))
                out[side.name][n].append(result)
                print(
                    f"round {r + 1} {side.name:>20} {n:>3} streams: {result.rate:7.1f} tok/s, "
                    f"TTFT p50 {result.ttft:6.2f} s, {result.refused} refused",
                    flush=True,
                )
            first += n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", help="the binary `make llama-server` builds")
    parser.add_argument("--rounds", type=int, default=3, help="times each level runs on each side (medians)")
    parser.add_argument(
        "--topology",
        metavar="W,T,S",
        help="ARK alone (no llama-server) on W chat workers of T threads and S sequences each, to compare layouts",
    )
    args = parser.parse_args()
    if args.topology:
        topology(args.topology)
        return
    if not args.llama_server:
        parser.error("--llama-server is required (or --topology)")
    config = load_config(env={})
    model = config.models_for(Capability.CHAT)[0]
    gguf = resolve_model_path(model.path)
    tmp = Path(tempfile.mkdtemp(prefix="ark-bench-batching-"))

    # All three servers stay up for the whole run (an idle one takes no CPU), so that their runs can interleave.
    stack = start_stack(tmp / "ark")
    servers: list[subprocess.Popen] = []
    try:
        url = f"{stack.base_url}/chat/completions"
        sides = [Side("ARK", url, stack.api_key, "gpt-4o")]
        for parallel in (8, 16):
            server, server_url = start_llama_server(
                args.llama_server, gguf, parallel, tmp / f"llama-server-{parallel}.log"
            )
            servers.append(server)
            sides.append(Side(f"llama-server -np {parallel}", server_url, "none", "any"))
        results = rounds(sides, args.rounds)
        for server in servers:
            server.terminate()
            server.wait(30)
        single = single_stream(url, stack.api_key, "gpt-4o")
        valid, asked = structured(url, stack.api_key, "gpt-4o")
        refused_burst = burst(url, stack.api_key, "gpt-4o")
    finally:
        for server in servers:
            if server.poll() is None:
                server.terminate()
                server.wait(30)
        stack.stop()
    workers = len(config.services.chat.workers)
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ[WORKERS_ON_HOST_ENV] = str(workers)
    reference = in_process(gguf, threads)

    names = [side.name for side in sides]
    print(
        f"\n{TOKENS} tokens per stream, distinct prompts, {args.rounds} interleaved rounds; median tok/s together, "
        "median TTFT p50, refusals in all rounds; ARK / the better llama-server's median, and each round's ratio"
    )
    print(
        f"{'streams':>7} | {'ARK':>26} | {'llama-server -np 8':>26} | {'llama-server -np 16':>26} | ARK/best | rounds"
    )
    for n in LEVELS:
        rate = {name: statistics.median(r.rate for r in results[name][n]) for name in names}
        cells = []
        for name in names:
            ttft = statistics.median(r.ttft for r in results[name][n])
            refused = sum(r.refused for r in results[name][n])
            cells.append(f"{rate[name]:6.1f} tok/s {ttft:5.2f} s {refused:2d} ref")
        best = max(rate[name] for name in names[1:])
        each = [
            results["ARK"][n][i].rate / max(results[name][n][i].rate for name in names[1:]) for i in range(args.rounds)
        ]
        print(
            f"{n:>7} | "
            + " | ".join(f"{c:>26}" for c in cells)
            + f" | {rate['ARK'] / best:7.2f}x | "
            + " ".join(f"{x:.2f}" for x in each)
        )
    print(
        f"\nsingle stream decode: ARK {single:.1f} tok/s, in-process {reference:.1f} tok/s: {single / reference:.2f}x"
    )
    print(f"json_schema streams in a batch of 8: {valid} of {asked} valid")
    print(f"six-user burst of ~1,200-token documents: {refused_burst} refused")


def topology(spec: str) -> None:
    """The sweep, the single stream and the burst on ARK with W workers x T threads x S sequences (deploy/ark.yaml
    otherwise): how the default layout for this machine was chosen (docs/configuration.md)."""
    workers, threads, sequences = (int(part) for part in spec.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="ark-bench-topology-"))
    config = (Path(__file__).resolve().parents[1] / "deploy" / "ark.yaml").read_text()
    config = config.replace("n_seq: auto", f"n_seq: {sequences}").replace("n_threads: auto", f"n_threads: {threads}")
    (tmp / "ark.yaml").write_text(config)
    stack = start_stack(tmp / "ark", chat_workers=workers, extra_env={"ARK_CONFIG": str(tmp / "ark.yaml")})
    try:
        url = f"{stack.base_url}/chat/completions"
        rounds([Side(f"ARK {workers}x{threads}x{sequences}", url, stack.api_key, "gpt-4o")], 1)
        print(f"single stream decode: {single_stream(url, stack.api_key, 'gpt-4o'):.1f} tok/s")
        print(f"six-user burst of ~1,200-token documents: {burst(url, stack.api_key, 'gpt-4o')} refused")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
