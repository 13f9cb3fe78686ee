"""`ark up`: run the whole stack locally (what `make run` calls).

Starts each service as its own process (the same topology as in containers), waits for every health check,
prints the base URL and an example, and on Ctrl-C or SIGTERM stops every child and frees every port.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from services.common.config import ArkConfig, Capability, ConfigError, load_config
from services.launcher.processes import Child, Stack, python_module

ROOT = Path(__file__).resolve().parents[2]


# Single-process services: (capability, name, module); started when the configuration has models for them.
SERVICES = [
    (Capability.EMBEDDINGS, "embeddings", "services.embeddings"),
    (Capability.TRANSCRIPTION, "transcription", "services.transcription"),
]


def build_stack(config: ArkConfig, config_path: str | None, log_dir: Path) -> list[Child]:
    """The processes for `config`, in start order (every service before the edge)."""
    config_args = ["--config", config_path] if config_path else []
    children = []
    if config.sessions.enabled:  # first: chat workers register with it as they start
        address = config.services.registry.address
        argv = python_module("services.sessions", *config_args, "--address", address)
        children.append(Child("session registry", argv, address, "grpc", log_dir / "registry.log"))
    for capability, name, module in SERVICES:
        if config.models_for(capability) and importlib.util.find_spec(module) is not None:
            address = getattr(config.services, name).address
            argv = python_module(module, *config_args, "--address", address)
            children.append(Child(name, argv, address, "grpc", log_dir / f"{name}.log"))
    children += [
        Child(
            f"chat worker {i + 1}",
            python_module("services.chat", *config_args, "--address", address),
            address,
            "grpc",
            log_dir / f"chat-{i + 1}.log",
        )
        for i, address in enumerate(config.services.chat.workers)
    ]
    edge_address = f"{config.edge.host}:{config.edge.port}"
    children.append(Child("edge", python_module("edge", *config_args), edge_address, "http", log_dir / "edge.log"))
    return children


def _example(base_url: str, key: str, model: str) -> str:
    return f"""
ARK is ready.  Base URL: {base_url}
API key: {key}

  curl {base_url}/chat/completions -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="{key}")
  print(client.chat.completions.create(model="{model}",
        messages=[{{"role": "user", "content": "What is the capital of France?"}}]).choices[0].message.content)

Press Ctrl-C to stop.
"""


def up(args: argparse.Namespace) -> int:
    env: dict[str, str] = {}
    try:
        config = load_config(args.config)
        if not config.auth.api_keys:
            env["ARK_API_KEY"] = os.environ.get("ARK_API_KEY") or f"ark-dev-{secrets.token_urlsafe(18)}"
            config = load_config(args.config, {**os.environ, **env})
    except ConfigError as exc:
        print(f"ark: {exc}", file=sys.stderr)
        return 2
    key = config.auth.api_keys[0]
    log_dir = Path(args.log_dir)
    stack = Stack(build_stack(config, args.config, log_dir), env)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"Starting ARK (logs in {log_dir}/)", flush=True)
    try:
        stack.start(progress=lambda line: print(line, flush=True))
    except RuntimeError as exc:
        print(f"ark: {exc}", file=sys.stderr, flush=True)
        stack.stop()
        return 1
    host = "127.0.0.1" if config.edge.host in ("0.0.0.0", "") else config.edge.host
    scheme = "https" if config.edge.tls else "http"
    base_url = f"{scheme}://{host}:{config.edge.port}/v1"
    chat_model = next((m for m in config.models if m.capability == "chat"), config.models[0])
    print(_example(base_url, key, chat_model.aliases[0] if chat_model.aliases else chat_model.id), flush=True)
    print(f"ARK_BASE_URL={base_url}", flush=True)
    while not stop.wait(0.5):
        for child in stack.children:
            code = child.exited()
            if code is not None and not getattr(child, "reported", False):
                child.reported = True
                print(f"ark: {child.name} exited with code {code}; see {child.log_path}", file=sys.stderr, flush=True)
    print("\nStopping ARK…", flush=True)
    stack.stop()
    print("Stopped.", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ark", description="ARK: an OpenAI-compatible inference API")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the whole stack and print the base URL")
    p_up.add_argument("--config", default=os.environ.get("ARK_CONFIG"), help="configuration file")
    p_up.add_argument("--log-dir", default=str(ROOT / ".run" / "logs"), help="where child processes log")
    p_check = sub.add_parser("check-config", help="validate a configuration file and exit")
    p_check.add_argument("--config", default=os.environ.get("ARK_CONFIG"))
    args = parser.parse_args(argv)
    if args.command == "up":
        sys.exit(up(args))
    try:
        load_config(args.config)
    except ConfigError as exc:
        print(f"ark: {exc}", file=sys.stderr)
        sys.exit(2)
    print("configuration OK")
