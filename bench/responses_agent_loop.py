"""An agent loop through ARK's Responses API, its chat completions, and ARK without sessions, in one run.

U users (8) each open a conversation with a document of about 1,500 tokens (bench/multi_user_sessions.py's numbered
facts) and a lookup tool, then take T turns (10). Every other turn is a tool call: on odd turns the user asks for a
lookup with `tool_choice: required` (the answer is a function call), and the next turn sends the tool's output with
the next question. The users take turns round robin, one request at a time, so each conversation's state must
survive the others' turns. Variants, each user's turn played on every variant in a row (the machine is shared; its
drift hits them alike; (e) and (d) run after them):

    (a) /v1/responses with `previous_response_id`: only the new items are sent;
    (b) /v1/responses with `store: false`, the whole history every turn and `prompt_cache_key` (Codex's shape);
    (c) /v1/chat/completions with the whole history;
    (e) /v1/chat/completions with the whole history on a second stack with sessions off globally
        (`sessions.enabled: false`), played after (a)-(c) with the same users and turns;
    (d) llama.cpp's `llama-server` /v1/responses with the whole history like (b), at its default settings (its slots
        and host prompt cache on), started on the chat model's GGUF file: `--llama-server` (a path to the binary,
        `make llama-server` builds it; `make bench` passes it). Without it, (d) is not run and the report says so.

Each variant's opening names the variant, so no variant reuses another's states. Every request is streamed; the time
to first token is the time to the first output item (a text delta or a function call). Goals (issue 20), at the last
turns: (a) and (b) within 1.1x of (c); (a) >= 15x faster than (e); (a) faster than (d); (a) reuses >= 90 % of each
later prompt.

    .venv/bin/python -m bench.responses_agent_loop [--users 8] [--turns 10] [--doc-tokens 1500] \
        [--llama-server .cache/llama-server/build/bin/llama-server]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.multi_user_sessions import SYSTEM, Workload, question
from services.common.config import Capability, load_config, resolve_model_path
from tests.support.stack import free_port, start_stack

TOOL = {
    "name": "lookup_fact",
    "description": "Look a numbered fact up in the user's records.",
    "parameters": {
        "type": "object",
        "properties": {"fact": {"type": "integer"}},
        "required": ["fact"],
        "additionalProperties": False,
    },
}
MAX_TOKENS = 24


@dataclass
class Measured:
    user: int
    turn: int
    ttft: float
    prompt: int
    cached: int


@dataclass
class Variant:
    name: str
    label: str
    base_url: str
    key: str
    users: int
    turns: list[Measured] = field(default_factory=list)
    state: dict[int, Any] = field(default_factory=dict)


def _stream(http: httpx.Client, url: str, key: str, body: dict, *, fresh: bool = False) -> tuple[float, list[dict]]:
    """POST a streaming request; (seconds to the first output, the data events). `fresh`: on a connection of its
    own (llama-server closes a kept-alive connection after a stream, and the next request on it would fail)."""
    start = time.perf_counter()
    first = 0.0
    events: list[dict] = []
    headers = {"authorization": f"Bearer {key}"} | ({"connection": "close"} if fresh else {})
    with http.stream("POST", url, json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events.append(event)
            if not first and _is_output(event):
                first = time.perf_counter() - start
    return first or time.perf_counter() - start, events


def _is_output(event: dict) -> bool:
    if event.get("type") == "response.output_item.added":
        return True
    choices = event.get("choices") or []
    return bool(choices and (choices[0]["delta"].get("content") or choices[0]["delta"].get("tool_calls")))


def user_text(workload: Workload, u: int, t: int, variant: str) -> tuple[str | None, str]:
    """(instructions, the user's message) of turn t; odd turns ask for a lookup."""
    text, facts = workload.docs[u]
    ask = question(u, t, facts)
    if t % 2 == 1:
        ask = f"Use the lookup_fact tool to check fact {t}. " + ask
    if t == 0:
        return f"{SYSTEM} (Run {variant}.)", f"My notes:\n{text}\n\n{ask}"
    return None, ask


def play_responses(http: httpx.Client, v: Variant, workload: Workload, u: int, t: int, stateful: bool) -> None:
    st = v.state.setdefault(u, {"items": [], "previous": None, "call": None, "instructions": None})
    instructions, text = user_text(workload, u, t, v.name)
    st["instructions"] = instructions or st["instructions"]
    new: list[dict] = []
    if st["call"] is not None:
        new.append({"type": "function_call_output", "call_id": st["call"], "output": f"Fact {t - 1} is confirmed."})
    new.append({"role": "user", "content": text})
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "stream": True,
        "temperature": 0,
        "max_output_tokens": MAX_TOKENS,
        "tools": [{"type": "function", **TOOL}],
        "tool_choice": "required" if t % 2 == 1 else "auto",
        "parallel_tool_calls": False,
        "instructions": st["instructions"],
    }
    if stateful:
        body |= {"input": new, "previous_response_id": st["previous"]}
    else:
        body |= {"input": st["items"] + new, "store": False, "prompt_cache_key": f"{v.name}-user-{u}"}
    ttft, events = _stream(http, f"{v.base_url}/responses", v.key, body, fresh=v.name == "d")
    final = events[-1]["response"]
    if final["status"] not in ("completed", "incomplete"):
        raise RuntimeError(f"{v.name}: response {final['status']}: {final.get('error')}")
    st["previous"] = final["id"]
    st["items"] += new + final["output"]
    calls = [o for o in final["output"] if o["type"] == "function_call"]
    st["call"] = calls[0]["call_id"] if calls else None
    usage = final["usage"]
    v.turns.append(Measured(u, t, ttft, usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]))


def play_chat(http: httpx.Client, v: Variant, workload: Workload, u: int, t: int) -> None:
    st = v.state.setdefault(u, {"messages": [], "call": None})
    instructions, text = user_text(workload, u, t, v.name)
    if instructions:
        st["messages"].append({"role": "system", "content": instructions})
    if st["call"] is not None:
        st["messages"].append({"role": "tool", "tool_call_id": st["call"], "content": f"Fact {t - 1} is confirmed."})
    st["messages"].append({"role": "user", "content": text})
    body = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "messages": st["messages"],
        "tools": [{"type": "function", "function": TOOL}],
        "tool_choice": "required" if t % 2 == 1 else "auto",
        "parallel_tool_calls": False,
    }
    ttft, events = _stream(http, f"{v.base_url}/chat/completions", v.key, body)
    text_parts, calls = [], {}
    for e in events:
        for c in e.get("choices") or []:
            text_parts.append(c["delta"].get("content") or "")
            for call in c["delta"].get("tool_calls") or []:
                got = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                got["id"] = got["id"] or call.get("id", "")
                got["name"] = got["name"] or (call.get("function") or {}).get("name", "")
                got["arguments"] += (call.get("function") or {}).get("arguments") or ""
    if calls:
        tool_calls = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls.values()
        ]
        st["messages"].append({"role": "assistant", "content": None, "tool_calls": tool_calls})
        st["call"] = tool_calls[0]["id"]
    else:
        st["messages"].append({"role": "assistant", "content": "".join(text_parts)})
        st["call"] = None
    if "error" in events[-1]:
        raise RuntimeError(f"{v.name}: {events[-1]['error']}")
    usage = events[-1]["usage"]
    v.turns.append(Measured(u, t, ttft, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))


def play(http: httpx.Client, v: Variant, workload: Workload, u: int, t: int) -> None:
    if v.name == "a":
        play_responses(http, v, workload, u, t, stateful=True)
    elif v.name in ("b", "d"):
        play_responses(http, v, workload, u, t, stateful=False)
    else:
        play_chat(http, v, workload, u, t)


def last(v: Variant, turns: int) -> list[Measured]:
    return [m for m in v.turns if m.turn == turns - 1]


def report(variants: list[Variant], turns: int) -> None:
    print(f"\n{'variant':44} {'users':>5} {'TTFT last turn (median s)':>26} {'reuse later turns':>18}")
    medians = {}
    for v in variants:
        final = last(v, turns)
        later = [m for m in v.turns if m.turn > 0]
        medians[v.name] = statistics.median(m.ttft for m in final)
        reuse = min(m.cached / m.prompt for m in later) if later else 0.0
        print(f"{v.label:44} {v.users:>5} {medians[v.name]:>26.3f} {reuse:>17.1%} (min)")
    if "c" in medians:
        for name in ("a", "b"):
            if name in medians:
                print(f"({name}) / (c) at the last turn: {medians[name] / medians['c']:.2f}x   (goal <= 1.1x)")
    if "e" in medians and "a" in medians:
        print(f"(e) / (a) at the last turn: {medians['e'] / medians['a']:.1f}x   (goal >= 15x)")
    if "d" in medians and "a" in medians:
        print(f"(d) / (a) at the last turn: {medians['d'] / medians['a']:.1f}x   (goal > 1: (a) faster than (d))")
    print("(one run on a shared 2-core machine: other processes add noise to every figure)")


def start_llama_server(binary: str, model_path: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [binary, "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port), "--jinja"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"llama-server did not start; log in {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--doc-tokens", type=int, default=1500)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", ""), help="llama-server binary")
    args = parser.parse_args()
    model_path = resolve_model_path(load_config(env={}).models_for(Capability.CHAT)[0].path)
    workload = Workload(model_path, args.users, args.turns - 1, args.doc_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="ark-bench-responses-"))
    # A loaded machine may keep a worker busy past the edge's hang detection; this measures speed, not that.
    patient = {
        "ARK__EDGE__WORKER_HANG_SECONDS": "600",
        "ARK__EDGE__EVENT_TIMEOUT_SECONDS": "600",
        "ARK__EDGE__FIRST_EVENT_TIMEOUT_SECONDS": "600",
        "ARK__EDGE__WORKER_PROBE_TIMEOUT_SECONDS": "10",
    }
    ark = [
        Variant("a", "(a) responses, previous_response_id", "", "", args.users),
        Variant("b", "(b) responses, store:false + prompt_cache_key", "", "", args.users),
        Variant("c", "(c) chat completions, full history", "", "", args.users),
    ]
    off = Variant("e", "(e) chat completions, sessions off", "", "", args.users)
    processes = []
    try:
        with stack_for(tmp / "stack", patient, ark):
            run_turns(ark, workload, args.turns)
        with stack_for(tmp / "stack-sessions-off", patient | {"ARK__SESSIONS__ENABLED": "false"}, [off]):
            run_turns([off], workload, args.turns)
        variants = [*ark, off]
        if args.llama_server:
            process, url = start_llama_server(args.llama_server, model_path, tmp / "llama-server.log")
            processes.append(process)
            d = Variant("d", "(d) llama-server /v1/responses, full history", url, "none", args.users)
            run_turns([d], workload, args.turns)
            variants.append(d)
        else:
            print("(d) llama-server: not run (--llama-server names its binary; `make llama-server` builds it)")
        report(variants, args.turns)
    finally:
        for process in processes:
            process.terminate()


@contextlib.contextmanager
def stack_for(log_dir: Path, env: dict[str, str], variants: list[Variant]) -> Iterator[None]:
    stack = start_stack(log_dir, extra_env=env)
    for v in variants:
        v.base_url, v.key = stack.base_url, stack.api_key
    try:
        yield
    finally:
        stack.stop()


def run_turns(variants: list[Variant], workload: Workload, turns: int) -> None:
    """Every user's turn t on every variant in a row, round robin; a line per turn so a cut run still tells."""
    with httpx.Client() as http:
        for t in range(turns):
            for u in range(max(v.users for v in variants)):
                for v in variants:
                    if u < v.users:
                        play(http, v, workload, u, t)
            for v in variants:
                now = [m for m in v.turns if m.turn == t]
                ttft = statistics.median(m.ttft for m in now)
                reuse = sum(m.cached for m in now) / sum(m.prompt for m in now)
                print(f"{v.label}: turn {t + 1}: median TTFT {ttft:.3f} s, reused {reuse:.0%}", flush=True)


if __name__ == "__main__":
    main()
