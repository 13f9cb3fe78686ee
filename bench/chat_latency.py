"""Chat latency through ARK versus llama-cpp-python in-process, side by side in one run.

Same model file, same settings, same prompts (greedy, so both sides generate the same tokens), alternating
between the two so that machine noise hits both alike. Reports, per side, the median time to first token (TTFT)
and decode speed, and the ratios the foundation issue sets goals for:
    decode through ARK >= 0.95x in-process;  stateless TTFT overhead <= 10 ms.
A constrained side (`response_format` json_schema, the same prompts) measures what the constraint engine costs:
    constrained decode >= 0.90x unconstrained decode through ARK.

    .venv/bin/python -m bench.chat_latency [--rounds 8] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import llama_cpp

from services.chat.engines.llama_cpp import llama_settings
from services.common.config import Capability, load_config, resolve_model_path
from services.common.cpu import WORKERS_ON_HOST_ENV
from tests.support.stack import start_stack

TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a mountain village",
    "a clockmaker",
    "a desert caravan",
    "a deep-sea diver",
    "a city library",
    "a winter festival",
    "a river ferry",
    "an old violin",
]


def prompts(rounds: int) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (take {i})."},
        ]
        for i in range(rounds)
    ]


def run_in_process(llama: llama_cpp.Llama, messages, max_tokens: int) -> tuple[float, float, int]:
    """TTFT (s), decode tokens/s, tokens — the way an in-process user streams a chat completion."""
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    for chunk in llama.create_chat_completion(messages, temperature=0, max_tokens=max_tokens, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
    return first - start, (tokens - 1) / (last - first), tokens


# A long required string keeps the constrained output going for the whole token budget, like the stories.
STORY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 80}, "story": {"type": "string", "minLength": 2000}},
    "required": ["title", "story"],
    "additionalProperties": False,
}


def run_through_ark(
    http: httpx.Client, base_url: str, key: str, messages, max_tokens: int, *, constrained: bool = False
) -> tuple[float, float, int]:
    """TTFT (s) to the first content chunk, decode tokens/s, tokens — over real HTTP/SSE."""
    body = {
        "model": "gpt-4o",
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "session": "none",  # stateless, like the in-process reference: the figure the issue sets a goal for
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY_SCHEMA}}
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with http.stream(
        "POST", f"{base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first - start, (tokens - 1) / (last - first), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    config = load_config(env={})
    model = config.models_for(Capability.CHAT)[0]
    # The settings a chat worker runs with under `ark up` (threads: its share of this machine's cores).
    settings, _ = llama_settings(model, env={WORKERS_ON_HOST_ENV: str(len(config.services.chat.workers))})
    llama = llama_cpp.Llama(model_path=str(resolve_model_path(model.path)), verbose=False, **settings)
    stack = start_stack(Path(tempfile.mkdtemp(prefix="ark-bench-")))
    results: dict[str, list[tuple[float, float, int]]] = {
        "in-process": [],
        "ARK": [],
        "ARK edge": [],
        "ARK schema": [],
    }
    edge_url = f"http://{stack.addresses['edge']}/v1"  # the in-cluster port, without Envoy in front
    try:
        with httpx.Client(timeout=300) as http:
            warm = prompts(1)[0]
            run_in_process(llama, warm, 8)
            run_through_ark(http, stack.base_url, stack.api_key, warm, 8)
            run_through_ark(http, stack.base_url, stack.api_key, warm, 8, constrained=True)  # compiles, caches
            for messages in prompts(args.rounds):
                results["in-process"].append(run_in_process(llama, messages, args.max_tokens))
                results["ARK"].append(run_through_ark(http, stack.base_url, stack.api_key, messages, args.max_tokens))
                results["ARK edge"].append(run_through_ark(http, edge_url, stack.api_key, messages, args.max_tokens))
                results["ARK schema"].append(
                    run_through_ark(http, stack.base_url, stack.api_key, messages, args.max_tokens, constrained=True)
                )
    finally:
        stack.stop()

    def med(side: str, i: int) -> float:
        return statistics.median(r[i] for r in results[side])

    print(
        f"\nChat latency, SmolLM2-135M Q4_1, {args.rounds} prompts x {args.max_tokens} tokens (median), "
        f"{settings['n_threads']} decode threads on both sides"
    )
    print(f"{'':12} {'TTFT ms':>9} {'decode tok/s':>13} {'tokens':>7}")
    for side in results:
        print(f"{side:12} {med(side, 0) * 1000:9.1f} {med(side, 1):13.1f} {med(side, 2):7.0f}")
    overhead = (med("ARK", 0) - med("in-process", 0)) * 1000
    ratio = med("ARK", 1) / med("in-process", 1)
    print(f"\nTTFT overhead through ARK: {overhead:+.1f} ms   (goal <= 10 ms)")
    print(f"decode ratio ARK / in-process: {ratio:.3f}x   (goal >= 0.95x)")
    edge_overhead = (med("ARK edge", 0) - med("in-process", 0)) * 1000
    edge_ratio = med("ARK edge", 1) / med("in-process", 1)
    print(f"edge port without Envoy: TTFT {edge_overhead:+.1f} ms, decode {edge_ratio:.3f}x")
    constrained = med("ARK schema", 1) / med("ARK", 1)
    print(f"decode ratio json_schema / unconstrained through ARK: {constrained:.3f}x   (goal >= 0.90x)")


if __name__ == "__main__":
    main()
