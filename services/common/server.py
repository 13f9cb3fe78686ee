"""Bootstrap shared by every ARK gRPC service: one server with health, reflection, error mapping, metrics and
limits.

`create_server()` returns the server and the port it bound (port 0 picks a free one, which the tests use);
`serve()` runs it until SIGTERM/SIGINT, first flipping health to NOT_SERVING so that load balancers stop sending
new work, then letting in-flight calls finish within the grace period. With a metrics port (`ARK_METRICS_PORT`, set
by the launcher from the configuration) it also serves Prometheus metrics on that port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics
from services.common.admission import Admission
from services.common.channels import MAX_MESSAGE_BYTES
from services.common.grpc_metrics import MetricsGuard
from services.common.guards import CallGuard, ErrorGuard, TokenGuard, guarded
from services.common.shutdown import EXIT_MARGIN_SECONDS, ShutdownGuard, exit_after
from services.common.startup import freeze_startup_objects

log = logging.getLogger(__name__)

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Detect a vanished edge within ~40 s even on an idle connection, so its aborted streams free their slots.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Clients ping every 4 s (services/common/channels.py); accept that rather than answer with GOAWAY (too many pings).
    ("grpc.http2.min_ping_interval_without_data_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class Service:
    """A servicer with the hook that registers it and the full service name (for health and reflection)."""

    def __init__(self, name: str, servicer: object, register: Callable[[object, grpc.aio.Server], None]) -> None:
        self.name = name
        self.servicer = servicer
        self.register = register


def create_server(
    services: Iterable[Service], address: str, *, shutdown: ShutdownGuard | None = None, token: str | None = None
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build a server for `services` bound to `address` (`host:0` for a free port).

    With `shutdown`, its calls can be ended with a status when the server stops (services/common/shutdown.py).
    """
    services = list(services)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    # Metrics outermost: they record the status the error guard produced; the shutdown guard innermost, so that
    # the error it raises for a call it ended becomes that call's status.
    guards: list[CallGuard] = [MetricsGuard(), ErrorGuard()]
    if token:
        guards.append(TokenGuard(token))  # calls without ARK's internal token are refused (health checks excepted)
    if shutdown is not None:
        guards.append(shutdown)
    health_servicer = health.aio.HealthServicer()
    # Probes are guarded too: their calls show in the metrics, which is how an operator sees them arrive.
    health_pb2_grpc.add_HealthServicer_to_server(guarded(health_servicer, health.SERVICE_NAME, guards), server)
    for service in services:
        service.register(guarded(service.servicer, service.name, guards), server)
    names = [s.name for s in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str]) -> None:
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def serve(
    services: list[Service],
    address: str,
    *,
    grace_seconds: float = 10.0,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    metrics_port: int | None = None,
    token: str | None = None,
    admissions: Iterable[Admission] = (),
) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully (services/common/shutdown.py): NOT_SERVING, the work queued
    in `admissions` refused (the edge sends it elsewhere), calls in flight given `grace_seconds`, then ended with
    UNAVAILABLE; the process is gone by grace + a few seconds whatever happens.

    `metrics_port` defaults to `ARK_METRICS_PORT`; Prometheus metrics are served on the gRPC address's host. With
    `token` (`services.internal_token`), only calls carrying it are served (services/common/internal_auth.py).
    """
    shutdown = ShutdownGuard()
    server, port, health_servicer = create_server(services, address, shutdown=shutdown, token=token)
    metrics_port = metrics_port if metrics_port is not None else metrics.port_from_env()
    host = address.rpartition(":")[0].strip("[]")
    metrics_server = metrics.MetricsServer(host, metrics_port) if metrics_port else None
    freeze_startup_objects()
    await server.start()
    await mark_serving(health_servicer, [s.name for s in services])
    log.info("serving %s on port %d", ", ".join(s.name for s in services), port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watchdog = exit_after(grace_seconds + EXIT_MARGIN_SECONDS)
    log.info("stopping: %d call(s) in flight get up to %.0f s", shutdown.in_flight, grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    for admission in admissions:
        admission.close()
    if not await shutdown.wait_idle(grace_seconds):
        log.warning("grace over: ending %d call(s)", shutdown.end_all())
        await shutdown.wait_idle(2)
    await server.stop(1)
    if on_stop is not None:
        await on_stop()
    watchdog.cancel()
    if metrics_server is not None:
        metrics_server.close()
