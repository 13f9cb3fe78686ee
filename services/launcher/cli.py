"""`ark up`: run the whole stack locally (what `make run` calls).

Starts each service as its own process (the same topology as in containers), Envoy in front as the public entry
point, waits for every health check, prints the base URL and an example, and on Ctrl-C or SIGTERM drains the edge,
stops every child and frees every port. While it runs, a service that dies or hangs is restarted
(services/launcher/supervisor.py); `ark status` shows each one's state and restarts.

Also `ark envoy` (generate Envoy's configuration, run Envoy and drain it on SIGTERM: the entry point of Envoy's
container), `ark envoy-config` (print that configuration) and `ark probe` (a health check for container runtimes
without a gRPC probe).
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
from services.common.cpu import WORKERS_ON_HOST_ENV
from services.common.metrics import METRICS_PORT_ENV
from services.launcher.processes import Child, Stack, grpc_serving, http_ok, python_module, reachable
from services.launcher.supervisor import STATUS_FILE, RestartPolicy, Supervisor, format_status

# Envoy's modules are imported where they are used: its typed configuration takes a third of a second to import,
# which `ark probe` (a container health check, run every few seconds) should not pay.

ROOT = Path(__file__).resolve().parents[2]


# Single-process services: (capability, name, module); started when the configuration has models for them.
SERVICES = [
    (Capability.EMBEDDINGS, "embeddings", "services.embeddings"),
    (Capability.TRANSCRIPTION, "transcription", "services.transcription"),
]


def _grpc_child(
    name: str,
    argv: list[str],
    address: str,
    metrics_port: int | None,
    log_path: Path,
    env: dict[str, str] | None = None,
) -> Child:
    """A gRPC service process, with its Prometheus port (if any) on the host of its gRPC address."""
    env = env or {}
    if metrics_port is None:
        return Child(name, argv, address, "grpc", log_path, env=env)
    host = address.rpartition(":")[0]
    return Child(
        name,
        argv,
        address,
        "grpc",
        log_path,
        env={**env, METRICS_PORT_ENV: str(metrics_port)},
        other_addresses=(f"{host}:{metrics_port}",),
    )


def build_stack(config: ArkConfig, config_path: str | None, log_dir: Path) -> list[Child]:
    """The processes for `config`, in start order (every service before the edge, the edge before Envoy).

    Writes Envoy's generated configuration to `log_dir/envoy.yaml`.
    """
    config_args = ["--config", config_path] if config_path else []
    services = config.services
    children = []
    if config.sessions.enabled:  # first: chat workers register with it as they start
        address = services.registry.address
        argv = python_module("services.sessions", *config_args, "--address", address)
        children.append(
            _grpc_child("session registry", argv, address, services.registry.metrics_port, log_dir / "registry.log")
        )
    for capability, name, module in SERVICES:
        if config.models_for(capability) and importlib.util.find_spec(module) is not None:
            service = getattr(services, name)
            argv = python_module(module, *config_args, "--address", service.address)
            children.append(_grpc_child(name, argv, service.address, service.metrics_port, log_dir / f"{name}.log"))
    metrics_ports = services.chat.metrics_ports or [None] * len(services.chat.workers)
    children += [
        _grpc_child(
            f"chat worker {i + 1}",
            python_module("services.chat", *config_args, "--address", address),
            address,
            metrics_ports[i],
            log_dir / f"chat-{i + 1}.log",
            # They share this machine's cores: `n_threads: auto` gives each its part (services/chat/engines).
            {WORKERS_ON_HOST_ENV: str(len(services.chat.workers))},
        )
        for i, address in enumerate(services.chat.workers)
    ]
    children.append(
        Child(
            "edge",
            python_module("edge", *config_args),
            f"{config.edge.host}:{config.edge.port}",
            "http",
            log_dir / "edge.log",
            # Stopped first, and given its whole drain.
            stop_stage=0,
            stop_timeout=config.edge.drain_grace_seconds + 15,
        )
    )
    if config.envoy.enabled:
        from services.launcher import envoy_config
        from services.launcher.envoy_runner import envoy_command

        envoy = config.envoy
        log_dir.mkdir(parents=True, exist_ok=True)
        envoy_yaml = log_dir / "envoy.yaml"
        envoy_yaml.write_text(envoy_config.render(config))
        admin = f"{envoy.admin_host}:{envoy.admin_port}"
        children.append(
            Child(
                "envoy",
                envoy_command(envoy_yaml),
                f"{envoy.host}:{envoy.port}",
                "http",
                log_dir / "envoy.log",
                other_addresses=(admin,),
                health_url=f"http://{reachable(envoy.admin_host)}:{envoy.admin_port}/ready",
                stop_stage=1,
            )
        )
    return children


def public_base_url(config: ArkConfig) -> str:
    """The URL clients use: Envoy's listener, or the edge's when Envoy is switched off."""
    if config.envoy.enabled:
        host, port, tls = config.envoy.host, config.envoy.port, config.envoy.tls is not None
    else:
        host, port, tls = config.edge.host, config.edge.port, config.edge.tls
    return f"{'https' if tls else 'http'}://{reachable(host)}:{port}/v1"


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


def pinned_workers(config: ArkConfig) -> dict[str, str]:
    """Environment overrides naming the chat workers (and their metrics ports) of `config` one by one."""
    chat = config.services.chat
    env = {WORKERS_ENV: f"[{','.join(chat.workers)}]"}
    if chat.metrics_ports:
        env[METRICS_PORTS_ENV] = f"[{','.join(map(str, chat.metrics_ports))}]"
    return env


WORKERS_ENV = "ARK__SERVICES__CHAT__WORKERS"
METRICS_PORTS_ENV = "ARK__SERVICES__CHAT__METRICS_PORTS"
# The environment override of `services.internal_token` (services/common/internal_auth.py).
INTERNAL_TOKEN_ENV = "ARK__SERVICES__INTERNAL_TOKEN"
DRAIN_ENV = "ARK__EDGE__DRAIN_GRACE_SECONDS"
# `ark up` stops within --stop-timeout: a process manager (Kubernetes, Docker, systemd, supervisord) SIGKILLs
# a process that overstays its stop, commonly after 30 s (Docker's `stop` after 10 s: pass --stop-timeout 8).
DEFAULT_STOP_TIMEOUT_SECONDS = 25.0
# Of the stop, what the edge's drain leaves for the edge's own exit, Envoy and the services.
DRAIN_MARGIN_SECONDS = 10.0


def up(args: argparse.Namespace) -> int:
    env: dict[str, str] = {}
    try:
        config = load_config(args.config)
        if not config.auth.api_keys:
            env["ARK_API_KEY"] = os.environ.get("ARK_API_KEY") or f"ark-dev-{secrets.token_urlsafe(18)}"
            config = load_config(args.config, {**os.environ, **env})
        if config.services.internal_token is None:
            # Every process of this run shares one token, so nothing else on the host can call the services.
            env[INTERNAL_TOKEN_ENV] = secrets.token_urlsafe(32)
            config = load_config(args.config, {**os.environ, **env})
    except ConfigError as exc:
        print(f"ark: {exc}", file=sys.stderr)
        return 2
    # `workers: auto` is resolved from this machine's cores (services/common/cpu.py); every child gets the list
    # resolved here, so that the edge calls exactly the workers started.
    env.update(pinned_workers(config))
    # The edge's drain (and the workers' grace, which follows it) must fit in the bounded stop below.
    drain = min(config.edge.drain_grace_seconds, max(0.0, args.stop_timeout - DRAIN_MARGIN_SECONDS))
    if drain < config.edge.drain_grace_seconds:
        env[DRAIN_ENV] = f"{drain:g}"
        config = load_config(args.config, {**os.environ, **env})
    key = config.auth.api_keys[0]
    log_dir = Path(args.log_dir)
    try:
        stack = Stack(build_stack(config, args.config, log_dir), env)
    except FileNotFoundError as exc:  # no Envoy binary
        print(f"ark: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"Starting ARK (logs in {log_dir}/)", flush=True)
    try:
        stack.start(progress=lambda line: print(line, flush=True))
    except RuntimeError as exc:
        print(f"ark: {exc}", file=sys.stderr, flush=True)
        stack.stop(timeout=args.stop_timeout)
        return 1
    base_url = public_base_url(config)
    chat_model = next((m for m in config.models if m.capability == "chat"), config.models[0])
    print(_example(base_url, key, chat_model.aliases[0] if chat_model.aliases else chat_model.id), flush=True)
    print(f"ARK_BASE_URL={base_url}", flush=True)
    supervisor = Supervisor(
        stack.children,
        stack.env,
        log_dir,
        RestartPolicy(max_restarts=args.max_restarts, window=args.restart_window),
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
    while not stop.wait(0.5):
        supervisor.tick()  # restarts what died (services/launcher/supervisor.py)
    supervisor.stopping()
    print("\nStopping ARK…", flush=True)
    stack.stop(timeout=args.stop_timeout)
    print("Stopped.", flush=True)
    return 0


def probe(kind: str, target: str) -> int:
    """0 if `target` is healthy: `grpc HOST:PORT` (gRPC health SERVING) or `http URL` (200)."""
    return 0 if (grpc_serving(target) if kind == "grpc" else http_ok(target)) else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ark", description="ARK: an OpenAI-compatible inference API")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the whole stack and print the base URL")
    p_up.add_argument("--config", default=os.environ.get("ARK_CONFIG"), help="configuration file")
    p_up.add_argument("--log-dir", default=str(ROOT / ".run" / "logs"), help="where child processes log")
    p_up.add_argument(
        "--max-restarts", type=int, default=5, help="restarts of one service within --restart-window before giving up"
    )
    p_up.add_argument("--restart-window", type=float, default=300.0, help="seconds (see --max-restarts)")
    p_up.add_argument(
        "--stop-timeout",
        type=float,
        default=float(os.environ.get("ARK_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT_SECONDS)),
        help="on SIGTERM/Ctrl-C, every process is gone within this many seconds (the edge's drain is cut to fit)",
    )
    p_status = sub.add_parser("status", help="what `ark up` runs: each service's state, pid and restarts")
    p_status.add_argument("--log-dir", default=str(ROOT / ".run" / "logs"), help="the log directory of `ark up`")
    p_check = sub.add_parser("check-config", help="validate a configuration file and exit")
    p_check.add_argument("--config", default=os.environ.get("ARK_CONFIG"))
    p_print = sub.add_parser("envoy-config", help="print the Envoy configuration generated from ARK's")
    p_print.add_argument("--config", default=os.environ.get("ARK_CONFIG"))
    p_envoy = sub.add_parser("envoy", help="generate Envoy's configuration, run Envoy, drain it on SIGTERM")
    p_envoy.add_argument("--config", default=os.environ.get("ARK_CONFIG"))
    p_envoy.add_argument("--envoy-config", default="/tmp/ark-envoy.yaml", help="where to write Envoy's configuration")
    p_probe = sub.add_parser("probe", help="exit 0 if a service is healthy (container health checks)")
    p_probe.add_argument("kind", choices=["grpc", "http"])
    p_probe.add_argument("target", help="HOST:PORT for grpc, a URL for http")
    args = parser.parse_args(argv)
    if args.command == "up":
        sys.exit(up(args))
    if args.command == "probe":
        sys.exit(probe(args.kind, args.target))
    if args.command == "status":
        path = Path(args.log_dir) / STATUS_FILE
        if not path.exists():
            print(f"ark: no status in {path.parent} (is `ark up` running with this --log-dir?)", file=sys.stderr)
            sys.exit(1)
        print(format_status(path))
        sys.exit(0)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ark: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.command == "envoy-config":
        from services.launcher.envoy_config import render

        print(render(config), end="")
    elif args.command == "envoy":
        from services.launcher.envoy_runner import run_envoy

        sys.exit(run_envoy(config, Path(args.envoy_config)))
    else:
        print("configuration OK")
