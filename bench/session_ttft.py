"""Time to first token per turn for chat over a document: ARK with sessions, ARK without cookies, and
llama-cpp-python's own OpenAI server, in one run, on the same model file.

Four conversations run interleaved (turn 1 of each, then turn 2 of each, …), as concurrent users would. Turn 1
carries a document of about 1,500 tokens and a question; then five short turns (a question of about 20 words, an
answer of at most 40 tokens), so the last turn has about 2,000 tokens of history and under 100 new ones.

    (a) ARK, sessions: the official client keeps the ark_session_id cookie; the worker keeps each conversation's
        state and computes only the new tokens;
    (b) ARK, no cookies, on the same stack after (a): since conversations are placed by content within the API key
        (docs/sessions.md), a client without a cookie reuses state too, here even (a)'s for the same documents;
        computing every turn from scratch is `"session": "none"` (bench/multi_user_sessions.py, variant c);
    (c) llama-cpp-python's server (`python -m llama_cpp.server`, installed by this benchmark), which keeps one
        context and reuses it only when the next prompt extends the previous one.

Goals at the last turn: (a) >= 15x faster than (c); (b) as fast as (a) (the first wave's goal, (a) >= 20x faster
than a client without cookies, predates placement by content).

    .venv/bin/python -m bench.session_ttft
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from services.chat.engines.llama_cpp import llama_settings
from services.common.config import Capability, load_config, resolve_model_path
from tests.support.stack import free_port, start_stack

CONVERSATIONS = 4
QUESTIONS = [
    "Given the report above, which division grew the fastest last year, and what explanation does the report give?",
    "What does the report say about the risks facing the northern warehouses over the next two years, briefly?",
    "Summarise in one sentence how the company plans to spend the new investment described near the end, please.",
    "Which of the people named in the report is responsible for logistics, and what did they change recently?",
    "Is there anything in the report about customer satisfaction scores? If so, what were the headline numbers?",
    "Finally, list the three most important recommendations from the report, in order, each in a few words only.",
]
TOPICS = ["river ferries", "mountain railways", "coastal shipping", "city trams"]


def document(topic: str) -> str:
    """About 1,500 tokens of report-like prose, different for each conversation."""
    paragraphs = []
    for i in range(22):
        paragraphs.append(
            f"Section {i + 1}. The {topic} division reported that quarter {i % 4 + 1} revenue rose by {3 + i % 7} "
            f"percent, driven by new routes, longer opening hours and a loyalty scheme launched in spring. "
            f"Manager number {i + 1} noted that staffing at the northern warehouses remained a concern, while the "
            f"logistics team under Director Alvarez replaced the old scheduling software with a simpler system."
        )
    return "\n\n".join(paragraphs)


def first_messages(c: int) -> list[dict]:
    return [
        {"role": "system", "content": "You are a helpful assistant that answers questions about reports."},
        {"role": "user", "content": f"Here is a report:\n\n{document(TOPICS[c])}\n\n{QUESTIONS[0]}"},
    ]


def stream_ttft(http: httpx.Client, url: str, key: str, model: str, messages: list[dict]) -> tuple[float, str, int]:
    """TTFT (s) to the first content chunk; the answer; prompt tokens (when the server reports them)."""
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": 40,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, parts, prompt_tokens = 0.0, [], 0
    with http.stream("POST", f"{url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - start
                parts.append(chunk["choices"][0]["delta"]["content"])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return ttft, "".join(parts), prompt_tokens


def run(name: str, url: str, key: str, model: str, *, cookies: bool) -> list[list[float]]:
    """TTFT per conversation per turn, conversations interleaved."""
    clients = [httpx.Client(timeout=600) if cookies else None for _ in range(CONVERSATIONS)]
    history = [first_messages(c) for c in range(CONVERSATIONS)]
    ttfts: list[list[float]] = [[] for _ in range(CONVERSATIONS)]
    for t in range(len(QUESTIONS)):
        for c in range(CONVERSATIONS):
            if t:
                history[c].append({"role": "user", "content": QUESTIONS[t]})
            if clients[c] is not None:
                ttft, answer, prompt = stream_ttft(clients[c], url, key, model, history[c])
            else:
                with httpx.Client(timeout=600) as http:  # a fresh client: no cookie ever
                    ttft, answer, prompt = stream_ttft(http, url, key, model, history[c])
            history[c].append({"role": "assistant", "content": answer})
            ttfts[c].append(ttft)
        print(
            f"  {name}: turn {t + 1} median TTFT {statistics.median(x[t] for x in ttfts) * 1000:8.1f} ms"
            f" (prompt ~{prompt} tokens)",
            flush=True,
        )
    for client in clients:
        if client is not None:
            client.close()
    return ttfts


def ensure_llama_server() -> None:
    """llama-cpp-python's server needs its optional extras; install them into this environment if missing."""
    if importlib.util.find_spec("starlette_context") is None or importlib.util.find_spec("pydantic_settings") is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "starlette-context==0.5.1", "pydantic-settings==2.16.3"],
            check=True,
        )


def start_llama_server(
    model_path: Path, settings: dict, log: Path, *, extra: tuple[str, ...] = (), cwd: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """`python -m llama_cpp.server` on the chat workers' model file and llama.cpp `settings` (resolved, as
    `llama_settings` gives them), plus `extra` options; returns once it answers, with its base URL."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(settings.get("n_ctx", 8192)),
        "--n_threads",
        str(settings["n_threads"]),
        "--n_threads_batch",
        str(settings["n_threads_batch"]),
        "--n_batch",
        str(settings.get("n_batch", 512)),
        *extra,
    ]
    process = subprocess.Popen(argv, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"llama_cpp.server did not start; see {log}")


def main() -> None:
    ensure_llama_server()
    model = load_config(env={}).models_for(Capability.CHAT)[0]
    tmp = Path(tempfile.mkdtemp(prefix="ark-bench-sessions-"))
    results: dict[str, list[list[float]]] = {}
    stack = start_stack(tmp / "ark")
    try:
        print("(a) ARK with sessions")
        results["a"] = run("ARK sessions", stack.base_url, stack.api_key, "gpt-4o", cookies=True)
        print("(b) ARK without cookies")
        results["b"] = run("ARK no cookies", stack.base_url, stack.api_key, "gpt-4o", cookies=False)
    finally:
        stack.stop()
    # One process alone on the machine: all of its cores (ARK's workers share them).
    server_settings, _ = llama_settings(model, env={})
    server, url = start_llama_server(resolve_model_path(model.path), server_settings, tmp / "llama_server.log")
    try:
        print("(c) llama_cpp.server")
        results["c"] = run("llama_cpp.server", url, "none", "any", cookies=False)
    finally:
        server.terminate()
        server.wait(30)

    def last(key: str) -> float:
        return statistics.median(conv[-1] for conv in results[key])

    print(f"\nTTFT by turn (median of {CONVERSATIONS} interleaved conversations), ms")
    print(f"{'turn':>4} {'(a) sessions':>14} {'(b) no cookies':>15} {'(c) llama server':>17}")
    for t in range(len(QUESTIONS)):
        row = [statistics.median(conv[t] for conv in results[k]) * 1000 for k in "abc"]
        print(f"{t + 1:>4} {row[0]:14.1f} {row[1]:15.1f} {row[2]:17.1f}")
    print(f"\nlast turn: (a) is {last('b') / last('a'):.1f}x faster than (b)   (no cookie: placed by content, ~1x)")
    print(f"last turn: (a) is {last('c') / last('a'):.1f}x faster than (c)   (goal >= 15x)")


if __name__ == "__main__":
    main()
