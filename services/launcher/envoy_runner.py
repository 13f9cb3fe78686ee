"""Running Envoy: its command line, and `ark envoy`, the entry point of Envoy's container.

Envoy exits at once on SIGTERM, cutting the streams that pass through it. In a container, where it may be stopped
before the edges behind it (compose stops dependents first, Kubernetes stops pods independently), `ark envoy` runs
it as a child and on SIGTERM drains it first: listeners drain gracefully (connections are asked to close), requests
in flight finish within the edge's drain grace, then Envoy gets its SIGTERM. `ark up` needs none of this: it stops
the edge first, and Envoy only once nothing is in flight.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from services.common.config import ArkConfig
from services.launcher import envoy_config
from services.launcher.processes import reachable

log = logging.getLogger(__name__)

# The gauge of requests in flight on the public listener (its connection manager's stat prefix is "public").
_ACTIVE_REQUESTS = "http.public.downstream_rq_active"


def envoy_command(config_path: Path, log_level: str = "warn") -> list[str]:
    """Envoy's command line. No hot restart: it needs shared memory keyed by a base id, which two Envoys on one host
    would fight over. Access-log lines are flushed every second rather than every ten. Worker threads default to
    one (`ARK_ENVOY_CONCURRENCY`): a proxy in front of one edge needs no more, and every extra thread competes with
    the model for the same cores."""
    binary = str(envoy_config.envoy_binary())
    concurrency = os.environ.get("ARK_ENVOY_CONCURRENCY", "1")
    options = [
        "--disable-hot-restart",
        "--file-flush-interval-msec",
        "1000",
        "--log-level",
        log_level,
        "--concurrency",
        concurrency,
    ]
    return [binary, "-c", str(config_path), *options]


def run_envoy(config: ArkConfig, config_out: Path) -> int:
    """Write Envoy's configuration, run Envoy until it exits or a signal comes, drain it, return its exit code."""
    config_out.write_text(envoy_config.render(config))
    # A container's only log is its output: keep Envoy's start-up lines.
    process = subprocess.Popen(envoy_command(config_out, log_level="info"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while process.poll() is None and not stop.wait(0.5):
        pass
    if process.poll() is None:
        admin = f"http://{reachable(config.envoy.admin_host)}:{config.envoy.admin_port}"
        drain(admin, grace_seconds=config.edge.drain_grace_seconds + 5)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def drain(admin_url: str, *, grace_seconds: float) -> None:
    """Ask Envoy to drain its listeners, then wait until no request is in flight or the grace is over."""
    request = urllib.request.Request(f"{admin_url}/drain_listeners?graceful", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=2):
            pass
    except OSError as exc:
        log.warning("could not start Envoy's drain: %s", exc)
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        active = active_requests(admin_url)
        if not active:  # none, or the admin port is gone
            return
        time.sleep(0.5)


def active_requests(admin_url: str) -> int | None:
    """Requests in flight on the public listener, from Envoy's admin stats (None if unreadable)."""
    url = f"{admin_url}/stats?format=json&filter=^{_ACTIVE_REQUESTS.replace('.', '[.]')}$"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            stats = json.load(response).get("stats", [])
    except (OSError, ValueError):
        return None
    return next((int(s["value"]) for s in stats if s.get("name") == _ACTIVE_REQUESTS), None)
