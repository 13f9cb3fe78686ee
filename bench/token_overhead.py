"""CPU spent per generated token outside llama_decode, process by process, with the in-process reference beside it.

On a machine whose cores all decode, every CPU-millisecond that the engine's loop, the worker's event loop and gRPC,
the edge's JSON and SSE framing or Envoy spend on a token is taken from decoding. Wall-clock tokens/s on a shared
machine mostly measures the neighbours, so this benchmark counts CPU time instead (`/proc/<pid>/stat`, user +
system, of each process of `ark up`):

- N streams at once (1 and 16), each its own prompt and 128 tokens, through Envoy as a client sends them; for each
  process, CPU milliseconds per generated token; for the chat workers, the part inside `llama_decode` (the engine's
  own counter, `ark_chat_engine_cpu_seconds_total{part="decode"}`) and the rest;
- one greedy stream through ARK against in-process llama-cpp-python with the same threads: CPU per token (all of
  ARK's processes against the one process) and decode tokens/s, their ratio (issue 21: >= 0.95x);
- with `--llama-server`, the same levels against `llama-server -np 16` (as bench.batching starts it): its whole
  process's CPU per token beside ARK's processes' together, the cost of serving each token both ways.

    .venv/bin/python -m bench.token_overhead [--levels 1 16] [--tokens 128] [--llama-server BINARY]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.batching import level, start_llama_server, story, stream
from services.common.config import Capability, load_config, resolve_model_path
from services.common.cpu import WORKERS_ON_HOST_ENV
from tests.support.stack import RunningStack, pid_serving, start_stack

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (its threads included, its children not), or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *descendants(int(child))]
    return out


def processes(stack: RunningStack) -> dict[str, int]:
    """The stack's processes a chat stream goes through: Envoy, the edge, each chat worker (by their command line)."""
    workers = {pid_serving(stack.addresses[name]): name for name in stack.addresses if re.fullmatch(r"chat-\d+", name)}
    found: dict[str, int] = {}
    for pid in descendants(stack.process.pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if pid in workers:
            found[workers[pid]] = pid
        elif b"envoy" in argv[0]:
            found["envoy"] = pid
        elif argv[1:3] == [b"-m", b"edge"]:
            found["edge"] = pid
    return found


def engine_cpu(stack: RunningStack) -> dict[str, float]:
    """CPU seconds the chat workers' engine loops have spent, by part (`decode`: inside llama_decode; `rest`), from
    the workers' metrics."""
    parts = {"decode": 0.0, "rest": 0.0}
    for name in stack.addresses:
        if re.fullmatch(r"chat-\d+", name):
            for line in httpx.get(stack.metrics_url(name), timeout=10).text.splitlines():
                if line.startswith("ark_chat_engine_cpu_seconds_total{"):
                    part = re.search(r'part="(\w+)"', line)
                    if part is not None and part[1] in parts:
                        parts[part[1]] += float(line.rpartition(" ")[2])
    return parts


def snapshot(stack: RunningStack, pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: each process, the workers' main threads (event loop: generation layer, servicer,
    gRPC's Python side) together, and the engine loops' parts."""
    out = {name: cpu_seconds(pid) for name, pid in pids.items()}
    out["worker event loop"] = sum(cpu_seconds(pid, pid) for name, pid in pids.items() if name.startswith("chat"))
    out |= {f"engine {part}": seconds for part, seconds in engine_cpu(stack).items()}
    return out


@dataclass
class Load:
    streams: int
    tokens: int
    seconds: float
    cpu: dict[str, float]  # CPU seconds during the load: see `snapshot`
    ttfts: list[float]

    def per_token(self, name: str) -> float:
        """CPU milliseconds per generated token."""
        return 1000 * self.cpu[name] / self.tokens

    @property
    def breakdown(self) -> dict[str, float]:
        """CPU ms per token: inside llama_decode, then every other part of the path a token takes."""
        workers = sum(seconds for name, seconds in self.cpu.items() if re.fullmatch(r"chat-\d+", name))
        engine = self.cpu["engine decode"] + self.cpu["engine rest"]
        seconds = {
            "decode": self.cpu["engine decode"],
            "engine rest": self.cpu["engine rest"],
            "worker loop": self.cpu["worker event loop"],
            "worker other": workers - engine - self.cpu["worker event loop"],
            "edge": self.cpu.get("edge", 0.0),
            "envoy": self.cpu.get("envoy", 0.0),
        }
        return {name: 1000 * value / self.tokens for name, value in seconds.items()}


def measure(
    stack: RunningStack, pids: dict[str, int], n: int, tokens: int, *, temperature: float = 0.7, first: int = 0
) -> Load:
    url = f"{stack.base_url}/chat/completions"

    async def run() -> list:
        async with httpx.AsyncClient(timeout=600) as client:
            bodies = [
                {**story(first + i, "gpt-4o"), "max_tokens": tokens, "temperature": temperature} for i in range(n)
            ]
            return await asyncio.gather(*(stream(client, url, stack.api_key, b) for b in bodies))

    before = snapshot(stack, pids)
    start = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - start
    after = snapshot(stack, pids)
    done = [r for r in results if r is not None]
    cpu = {name: after[name] - before[name] for name in before}
    return Load(n, sum(r[1] for r in done), seconds, cpu, [r[0] for r in done])


def in_process(gguf: Path, threads: int, tokens: int) -> tuple[float, float]:
    """(decode tokens/s, CPU ms per decoded token) of one greedy generation in this process, after the prompt."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llama.tokenize(b"Write a long, detailed story about a lighthouse keeper.", special=True)
    count, start, cpu = 0, 0.0, 0.0
    for _ in llama.generate(prompt, temp=0.0):
        count += 1
        if count == 1:
            start, cpu = time.perf_counter(), time.process_time()
        if count == tokens:
            break
    rate = (count - 1) / (time.perf_counter() - start)
    cpu_ms = 1000 * (time.process_time() - cpu) / (count - 1)
    llama.close()
    return rate, cpu_ms


def llama_server_cpu(binary: str, gguf: Path, levels: list[int]) -> dict[int, tuple[float, float]]:
    """For each level, llama-server's tokens/s and its process's CPU ms per generated token (both its threads,
    its HTTP layer included), with bench.batching's prompts and 128 tokens a stream."""
    process, url = start_llama_server(binary, gguf, 16, Path(tempfile.mkdtemp(prefix="ark-bench-overhead-")) / "log")
    out: dict[int, tuple[float, float]] = {}
    try:
        first = 10_000
        for n in levels:  # warm: its slots hold earlier prompts, as they do in service
            asyncio.run(level(url, "none", "any", n, first))
            first += n
        for n in levels:
            first += n
            before = cpu_seconds(process.pid)
            result = asyncio.run(level(url, "none", "any", n, first))
            out[n] = (result.rate, 1000 * (cpu_seconds(process.pid) - before) / result.tokens)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--llama-server", help="also measure llama-server -np 16: the binary `make llama-server` builds"
    )
    args = parser.parse_args()
    config = load_config(env={})
    gguf = resolve_model_path(config.models_for(Capability.CHAT)[0].path)
    workers = len(config.services.chat.workers)
    threads = max(1, len(os.sched_getaffinity(0)) // workers)

    stack = start_stack(Path(tempfile.mkdtemp(prefix="ark-bench-overhead-")) / "ark")
    try:
        pids = processes(stack)
        for n in args.levels:  # warm: the edge's connections, and the workers hold earlier conversations
            measure(stack, pids, n, args.tokens, first=20_000 + 100 * n)
        loads = [measure(stack, pids, n, args.tokens, first=1000 + 100 * n) for n in args.levels]
        single = measure(stack, pids, 1, args.tokens, temperature=0.0)
    finally:
        stack.stop()
    os.environ[WORKERS_ON_HOST_ENV] = str(workers)
    reference_rate, reference_cpu = in_process(gguf, threads, args.tokens)
    server = llama_server_cpu(args.llama_server, gguf, args.levels) if args.llama_server else {}

    print(f"{args.tokens} tokens per stream, temperature 0.7; CPU ms per generated token, by where it is spent")
    parts = list(loads[0].breakdown)
    print(f"{'streams':>7} | {'tok/s':>6} | " + " | ".join(f"{p:>12}" for p in parts) + " | outside decode")
    for load in loads:
        cells = load.breakdown
        outside = sum(cells.values()) - cells["decode"]
        print(
            f"{load.streams:>7} | {load.tokens / load.seconds:6.1f} | "
            + " | ".join(f"{cells[p]:12.3f}" for p in parts)
            + f" | {outside:.3f} ms ({outside / sum(cells.values()):.1%})"
        )
    for load in loads if server else []:
        ark = sum(load.breakdown.values())
        rate, cpu = server[load.streams]
        print(
            f"{load.streams:>7} streams, CPU ms per token: ARK {ark:.3f} (its processes together), llama-server "
            f"-np 16 {cpu:.3f} (at {rate:.1f} tok/s): ARK / llama-server {ark / cpu:.2f}x"
        )
    ark_cpu = sum(single.breakdown.values())
    ark_rate = (single.tokens - 1) / (single.seconds - single.ttfts[0])
    cells = ", ".join(f"{part} {ms:.3f}" for part, ms in single.breakdown.items())
    print(f"\none greedy stream of {single.tokens} tokens, CPU ms per token: {cells}")
    print(
        f"one greedy stream, CPU ms per token: ARK {ark_cpu:.2f} (every process, prompt included), in-process "
        f"llama-cpp-python {reference_cpu:.2f} (decode): {reference_cpu / ark_cpu:.2f}x"
    )
    print(
        f"one greedy stream, decode tokens/s: ARK {ark_rate:.1f}, in-process {reference_rate:.1f}: "
        f"{ark_rate / reference_rate:.2f}x (wall clock: as good as the machine is idle)"
    )


if __name__ == "__main__":
    main()
