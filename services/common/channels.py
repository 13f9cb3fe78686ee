"""gRPC channel options of every ARK client (the edge's clients, a chat worker's lease, the registry's calls to
workers), apart from the server so that a client process loads nothing of a server (nor its metrics).
"""

from __future__ import annotations

# Audio uploads reach the transcription service in one message; 32 MiB covers OpenAI's 25 MB limit plus framing.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    # A name that resolves to several addresses (a Kubernetes headless Service over scaled-out chat workers) spreads
    # calls over all of them; a single address behaves as before.
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A peer that stops answering (a stopped or wedged process: its kernel still accepts the TCP bytes) fails every
    # call on the channel within 4 + 4 s: the bound on hang detection for callers without their own probes (the
    # edge probes chat workers faster, edge/clients/chat_workers.py). A ping is 17 bytes; one per 4 s costs nothing.
    ("grpc.keepalive_time_ms", 4_000),
    ("grpc.keepalive_timeout_ms", 4_000),
    # Also on idle channels, so a dead service is noticed before the next request rather than by it.
    ("grpc.keepalive_permit_without_calls", 1),
    # Keep pinging a stream that only receives (a long generation): the default stops after two pings without data.
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect fast after a worker restart: the default backoff can reach two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
