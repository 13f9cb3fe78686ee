"""A soak anyone can run (`make soak`): the whole stack under mixed traffic for a long time, watched for growth.

The stack starts as `make run` starts it (Envoy, edge, registry, two chat workers, embeddings, transcription). A
calibration phase first measures the capacity for the traffic mix below (completions per second with a few
requests always in flight); the soak then offers `--load` (70 % by default) of that capacity as Poisson arrivals
for `--minutes` (30 by default), each arrival one request of the mix:

    chat, streamed and not · conversations through one shared default client (one cookie for many users) and
    through one client per user, each a few turns long, then a new one (states move through the tiers) · a
    required tool call · a json_schema answer · embeddings · a transcription of real speech

Half-way through, one chat worker is killed with SIGKILL (`ark up` restarts it). Every `--sample-seconds` the run
records each process's resident memory and open file descriptors (/proc, by the pids `ark up` reports in its
status file) and the chat workers' state tiers (bytes in host memory and on disk, from their Prometheus metrics).

Per `--window-minutes` window it prints the latency p50/p99 of each kind, the requests by outcome (HTTP status, or
`conn` for a connection that failed) and, at the window's end, memory, descriptors and tier bytes. It ends with a
growth check: after the first window (models warming up, tiers filling), nothing may keep growing — a process's
memory by more than `--rss-growth-mb` between the second window and the last, or its descriptors by more than
`--fd-growth`. Exit status 1 when something grew or a request failed (a 5xx, an error event in a stream, a failed
connection) outside the minute after the kill; the JSON of every window goes to `.run/soak/`.

    .venv/bin/python -m bench.soak [--minutes 30] [--window-minutes 5] [--load 0.7] [--calibrate-seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.support.audio import SPEECH
from tests.support.stack import RunningStack, start_stack

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a mountain town", "bread", "trains", "a library", "winter", "bees", "the moon", "rivers", "tea"]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}},
            "required": ["name", "country"],
            "additionalProperties": False,
        },
    },
}
# Kind -> weight in the mix.
MIX = {
    "chat": 14,
    "chat_stream": 20,
    "session_shared": 16,
    "session_own": 12,
    "tools": 10,
    "json_schema": 6,
    "embeddings": 14,
    "transcription": 8,
}
TURNS_PER_CONVERSATION = 5


@dataclass
class Outcome:
    kind: str
    at: float  # seconds since the soak began
    seconds: float
    status: str  # "200", "429", "503", "conn", ...


@dataclass
class Conversation:
    history: list[dict] = field(default_factory=list)
    turns: int = 0
    busy: bool = False


class Traffic:
    """The request mix against one stack."""

    def __init__(self, stack: RunningStack, rng: random.Random) -> None:
        self.stack = stack
        self.rng = rng
        kw = {"base_url": stack.base_url, "api_key": stack.api_key, "max_retries": 0, "timeout": 600}
        self.kw = kw
        self.shared = openai.AsyncOpenAI(**kw)  # keeps cookies: one session for every user of the app
        self.own = [openai.AsyncOpenAI(**kw) for _ in range(8)]  # one client (one session) per user
        self.shared_users = [Conversation() for _ in range(12)]
        self.own_users = [Conversation() for _ in self.own]
        self.audio = SPEECH.data()
        self.asked = 0

    async def close(self) -> None:
        for client in [self.shared, *self.own]:
            await client.close()

    def question(self) -> str:
        # Numbered, so that no two requests are the same: identical requests would share the quarantine of one
        # that was running on the killed worker (edge/quarantine.py) and be refused with it.
        self.asked += 1
        return f"Question {self.asked}: write two sentences about {self.rng.choice(TOPICS)}."

    async def one(self, kind: str) -> None:
        client = self.shared
        if kind == "chat":
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": self.question()}], max_tokens=48
            )
        elif kind == "chat_stream":
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": self.question()}], max_tokens=64, stream=True
            )
            async for _ in stream:
                pass
        elif kind in ("session_shared", "session_own"):
            await self.turn(kind)
        elif kind == "tools":
            await client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": f"{self.question()} Then: the weather in Rome?"}],
                tools=[TOOL],
                tool_choice="required",
                max_tokens=48,
            )
        elif kind == "json_schema":
            await client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": f"{self.question()} Then name a city and its country."}],
                response_format=SCHEMA,
                max_tokens=48,
            )
        elif kind == "embeddings":
            await client.embeddings.create(
                model="text-embedding-3-small", input=[self.question() for _ in range(self.rng.randint(1, 16))]
            )
        elif kind == "transcription":
            await client.audio.transcriptions.create(model="whisper-1", file=(SPEECH.name, self.audio))

    async def turn(self, kind: str) -> None:
        users = self.shared_users if kind == "session_shared" else self.own_users
        free = [i for i, u in enumerate(users) if not u.busy]  # one conversation's turns go in order
        index = self.rng.choice(free) if free else 0
        user = users[index]
        client = self.shared if kind == "session_shared" else self.own[index]
        if user.turns >= TURNS_PER_CONVERSATION:
            user.history, user.turns = [], 0
        if not user.history:
            opening = " ".join(f"Fact {i}: user {index} likes {self.rng.choice(TOPICS)}." for i in range(40))
            user.history = [{"role": "system", "content": "You are a helpful assistant."}]
            user.history.append({"role": "user", "content": opening + " What do I like?"})
        else:
            user.history.append({"role": "user", "content": self.question()})
        user.busy = True
        try:
            reply = await client.chat.completions.create(model="gpt-4o", messages=user.history, max_tokens=32)
            user.history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
            user.turns += 1
        except BaseException:
            user.history, user.turns = [], 0
            raise
        finally:
            user.busy = False

    async def timed(self, kind: str, began: float, outcomes: list[Outcome]) -> None:
        start = time.monotonic()
        status = "200"
        try:
            await self.one(kind)
        except openai.APIStatusError as exc:
            status = str(exc.status_code)
        except (openai.APIConnectionError, httpx.HTTPError):
            status = "conn"
        except openai.APIError as exc:  # an error event in a stream that had begun (a worker killed under it)
            status = f"stream:{exc.code or 'error'}"
        outcomes.append(Outcome(kind, start - began, time.monotonic() - start, status))

    def pick(self) -> str:
        return self.rng.choices(list(MIX), weights=list(MIX.values()))[0]


async def calibrate(traffic: Traffic, seconds: float, in_flight: int) -> float:
    """Completions per second of the mix with `in_flight` requests always running (the stack's capacity)."""
    outcomes: list[Outcome] = []
    began = time.monotonic()

    async def loop() -> None:
        while time.monotonic() - began < seconds:
            await traffic.timed(traffic.pick(), began, outcomes)

    await asyncio.gather(*(loop() for _ in range(in_flight)))
    done = [o for o in outcomes if o.status == "200"]
    return len(done) / (time.monotonic() - began)


def process_sample(stack: RunningStack) -> dict[str, dict[str, float]]:
    """Resident memory (MB) and open descriptors of every process `ark up` runs, by service name."""
    status = json.loads((stack.log_dir / "status.json").read_text())
    sample = {}
    for name, service in status["services"].items():
        pid = service.get("pid")
        if not pid:
            continue
        try:
            rss_kb = next(
                int(line.split()[1])
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
            fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except (OSError, StopIteration):
            continue
        sample[name] = {"rss_mb": rss_kb / 1024, "fds": fds}
    return sample


def tier_sample(stack: RunningStack) -> dict[str, float]:
    """Bytes of conversation state per tier, summed over the chat workers."""
    totals: dict[str, float] = defaultdict(float)
    for name in stack.addresses:
        if not name.startswith("chat-") or name.endswith("-metrics"):
            continue
        try:
            text = httpx.get(stack.metrics_url(name), timeout=5).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            if family.name == "ark_chat_state_tier_bytes":
                for sample in family.samples:
                    totals[sample.labels["tier"]] += sample.value
    return dict(totals)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(outcomes: list[Outcome], samples: list[dict], window: float, minutes: float) -> list[dict]:
    windows = []
    count = max(1, round(minutes * 60 / window))
    for w in range(count):
        lo, hi = w * window, (w + 1) * window
        inside = [o for o in outcomes if lo <= o.at < hi]
        last = [s for s in samples if s["at"] < hi] or samples[:1]
        latency = {
            kind: {
                "p50": percentile([o.seconds for o in inside if o.kind == kind and o.status == "200"], 0.5),
                "p99": percentile([o.seconds for o in inside if o.kind == kind and o.status == "200"], 0.99),
            }
            for kind in MIX
        }
        windows.append(
            {
                "window": w + 1,
                "from_min": lo / 60,
                "to_min": hi / 60,
                "requests": len(inside),
                "by_status": dict(Counter(o.status for o in inside)),
                "latency": latency,
                "processes": last[-1]["processes"] if last else {},
                "tiers": last[-1]["tiers"] if last else {},
            }
        )
    return windows


def growth(windows: list[dict], rss_mb: float, fds: int) -> list[str]:
    """What grew between the end of the second window and the end of the last (the first is warm-up)."""
    if len(windows) < 3:
        return []
    first, last = windows[1]["processes"], windows[-1]["processes"]
    found = []
    for name, end in last.items():
        start = first.get(name)
        if start is None:
            continue
        if end["rss_mb"] - start["rss_mb"] > rss_mb:
            found.append(f"{name}: memory {start['rss_mb']:.0f} -> {end['rss_mb']:.0f} MB")
        if end["fds"] - start["fds"] > fds:
            found.append(f"{name}: descriptors {start['fds']:.0f} -> {end['fds']:.0f}")
    return found


def print_table(windows: list[dict]) -> None:
    print(
        "\n| window | requests | by status | chat p50/p99 s | stream p50/p99 s | session p50/p99 s "
        "| embeddings p50/p99 s | transcription p50/p99 s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in windows:
        lat = w["latency"]

        def cell(kind: str, lat=lat) -> str:
            return f"{lat[kind]['p50']:.2f} / {lat[kind]['p99']:.2f}"

        status = ", ".join(f"{k}: {v}" for k, v in sorted(w["by_status"].items()))
        print(
            f"| {w['from_min']:.0f}-{w['to_min']:.0f} min | {w['requests']} | {status} | "
            f"{cell('chat')} | {cell('chat_stream')} | {cell('session_shared')} | {cell('embeddings')} | "
            f"{cell('transcription')} |"
        )
    print("\n| window | " + " | ".join(sorted(windows[0]["processes"])) + " | tiers (host / disk MB) |")
    print("| --- |" + " --- |" * (len(windows[0]["processes"]) + 1))
    for w in windows:
        procs = " | ".join(
            f"{w['processes'][n]['rss_mb']:.0f} MB, {w['processes'][n]['fds']:.0f} fd" if n in w["processes"] else "—"
            for n in sorted(windows[0]["processes"])
        )
        tiers = w["tiers"]
        host = tiers.get("host", 0) / 2**20
        disk = tiers.get("disk", 0) / 2**20
        print(f"| {w['window']} | {procs} | {host:.0f} / {disk:.0f} |")


async def soak(args: argparse.Namespace) -> int:
    log_dir = ROOT / ".run" / "soak" / time.strftime("%Y%m%d-%H%M%S")
    stack = start_stack(log_dir / "logs")
    rng = random.Random(args.seed)
    traffic = Traffic(stack, rng)
    try:
        capacity = await calibrate(traffic, args.calibrate_seconds, args.in_flight)
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} requests/s with {args.in_flight} in flight; offering {rate:.2f}/s", flush=True)
        outcomes: list[Outcome] = []
        samples: list[dict] = []
        tasks: set[asyncio.Task] = set()
        began = time.monotonic()
        duration = args.minutes * 60
        killed_at: float | None = None
        next_sample = 0.0
        while (now := time.monotonic() - began) < duration:
            if killed_at is None and now >= duration * args.kill_at:
                killed_at = now
                print(f"{now / 60:.1f} min: SIGKILL chat-1", flush=True)
                await asyncio.to_thread(stack.kill, "chat-1")
            if now >= next_sample:
                next_sample = now + args.sample_seconds
                samples.append(
                    {
                        "at": now,
                        "processes": await asyncio.to_thread(process_sample, stack),
                        "tiers": await asyncio.to_thread(tier_sample, stack),
                    }
                )
            task = asyncio.create_task(traffic.timed(traffic.pick(), began, outcomes))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        samples.append({"at": duration, "processes": process_sample(stack), "tiers": tier_sample(stack)})
    finally:
        await traffic.close()
        stack.stop()
    windows = summarize(outcomes, samples, args.window_minutes * 60, args.minutes)
    print_table(windows)
    grew = growth(windows, args.rss_growth_mb, args.fd_growth)
    kill_minute = (killed_at or 0, (killed_at or 0) + 60)
    failed = [
        o
        for o in outcomes
        if o.status.startswith(("5", "stream", "conn")) and not kill_minute[0] <= o.at < kill_minute[1]
    ]
    report = log_dir / "soak.json"
    report.write_text(json.dumps({"args": vars(args), "capacity": capacity, "windows": windows}, indent=2))
    total = Counter(o.status for o in outcomes)
    print(f"\n{len(outcomes)} requests: {dict(total)}; report {report}")
    for line in grew:
        print(f"GREW: {line}")
    if failed:
        print(f"FAILED: {len(failed)} requests failed (5xx, error event, connection) outside the minute after the kill")
    return 1 if grew or failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--window-minutes", type=float, default=5.0)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity offered")
    parser.add_argument("--calibrate-seconds", type=float, default=60.0)
    parser.add_argument("--in-flight", type=int, default=4, help="requests in flight while calibrating")
    parser.add_argument("--sample-seconds", type=float, default=15.0)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of the soak at which chat-1 is killed")
    parser.add_argument("--rss-growth-mb", type=float, default=150.0)
    parser.add_argument("--fd-growth", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    raise SystemExit(asyncio.run(soak(parser.parse_args())))


if __name__ == "__main__":
    main()
