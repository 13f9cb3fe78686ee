"""ARK's configuration: one YAML file, overridable by path and by environment variables.

`load_config()` reads `deploy/ark.yaml` (or `$ARK_CONFIG`, or an explicit path), applies environment overrides and
validates everything up front, so a bad value stops start-up with a message naming the field instead of failing on
the first request.

Environment overrides: `ARK__SECTION__FIELD=value` sets any scalar (`ARK__LIMITS__MAX_TOKENS=512`); the shortcuts
`ARK_API_KEY` (the accepted key) and `ARK_PORT` (the public port) cover the two settings people change most.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.common.cpu import auto_workers

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "deploy" / "ark.yaml"
ENV_PREFIX = "ARK__"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending field (`problems`: one per field)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


def config_error(exc: ValidationError, where: str = "", *, source: str | None = None) -> ConfigError:
    """The one way a pydantic ValidationError becomes a ConfigError: every error, each named by its full field path
    below `where` (`models[chat].settings.n_threads: ...`), so that one start-up shows everything to fix."""
    problems = []
    for err in exc.errors():
        path = ".".join([where, *(str(p) for p in err["loc"])] if where else [str(p) for p in err["loc"]])
        problems.append(f"{path or '(top level)'}: {err['msg'].removeprefix('Value error, ')}")
    if source is None:
        return ConfigError("; ".join(problems), problems)
    return ConfigError("\n  ".join([f"invalid configuration in {source}:", *problems]), problems)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Capability(StrEnum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"
    TRANSCRIPTION = "transcription"


class EngineKind(StrEnum):
    LLAMA_CPP = "llama_cpp"
    SENTENCE_TRANSFORMERS = "sentence_transformers"
    FASTER_WHISPER = "faster_whisper"
    TENSORRT_LLM = "tensorrt_llm"


def resolve_model_path(spec: str) -> Path:
    """Turn `package:<python package>/<relative path>` or a filesystem path into an existing path.

    The `package:` form finds a file shipped inside an installed Python package without importing it (the
    packaged models' own modules may pull in dependencies ARK does not need).
    """
    if spec.startswith("package:"):
        package, _, rel = spec.removeprefix("package:").partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"python package {package!r} is not installed (run `make install`)")
        path = Path(next(iter(found.submodule_search_locations))) / rel
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"model path {spec!r} does not exist ({path})")
    return path


class ModelConfig(_Strict):
    """One served model."""

    id: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")]
    capability: Capability
    engine: EngineKind
    path: str = Field(min_length=1, description="filesystem path or package:<pkg>/<file>")
    aliases: list[str] = []
    owned_by: str = "ark"
    # Engine-specific settings (threads, context size, …): each engine's own `EngineSettings` model validates them
    # when the configuration is loaded (ENGINE_SETTINGS).
    settings: dict[str, Any] = {}


class EngineSettings(_Strict):
    """Base of every engine's settings model (the `settings:` of a model in the configuration)."""

    @classmethod
    def of(cls, model: ModelConfig) -> Self:
        """Parse `model.settings`; a bad value is a ConfigError naming `models[<id>].settings.<field>`."""
        try:
            return cls.model_validate(model.settings)
        except ValidationError as exc:
            raise config_error(exc, f"models[{model.id}].settings") from None


# Each engine's settings model, by capability and engine: modules without the engine libraries, so that every
# process (the edge included) checks every model's settings when it loads the configuration.
ENGINE_SETTINGS: dict[tuple[Capability, EngineKind], str] = {
    (Capability.CHAT, EngineKind.LLAMA_CPP): "services.chat.settings:LlamaCppSettings",
    (Capability.CHAT, EngineKind.TENSORRT_LLM): "services.chat.settings:TensorRTLLMChatSettings",
    (
        Capability.EMBEDDINGS,
        EngineKind.SENTENCE_TRANSFORMERS,
    ): "services.embeddings.settings:SentenceTransformersSettings",
    (Capability.EMBEDDINGS, EngineKind.TENSORRT_LLM): "services.embeddings.settings:TensorRTLLMEmbeddingsSettings",
    (Capability.TRANSCRIPTION, EngineKind.FASTER_WHISPER): "services.transcription.settings:FasterWhisperSettings",
    (Capability.TRANSCRIPTION, EngineKind.TENSORRT_LLM): "services.transcription.settings:TensorRTLLMWhisperSettings",
}


def settings_model(model: ModelConfig) -> type[EngineSettings]:
    """The settings model of `model`'s engine; a ConfigError if that engine cannot serve its capability."""
    target = ENGINE_SETTINGS.get((model.capability, model.engine))
    if target is None:
        raise ConfigError(f"models[{model.id}].engine: {model.engine} cannot serve {model.capability} models")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def engine_settings(model: ModelConfig) -> EngineSettings:
    """`model.settings`, validated by its engine's settings model."""
    return settings_model(model).of(model)


class SessionsConfig(_Strict):
    """Stateful session policy (the session contract in ARCHITECTURE.md)."""

    enabled: bool = True
    idle_timeout_seconds: Annotated[int, Field(gt=0, le=86400)] = 600
    max_age_seconds: Annotated[int, Field(gt=0, le=86400)] = 86400
    max_per_api_key: Annotated[int, Field(gt=0)] = 64
    max_total: Annotated[int, Field(gt=0)] = 1024
    # Chat workers renew their registration this often (a third of it); a worker silent for longer gets no new
    # sessions, and requests for its sessions are re-placed.
    worker_lease_seconds: Annotated[float, Field(gt=0)] = 6.0
    # How long the edge waits for the registry before serving a request statelessly.
    registry_timeout_seconds: Annotated[float, Field(gt=0)] = 0.5
    # Tiers (docs/sessions.md#tiers): when a worker's resident contexts are full, conversation states are saved to
    # host memory, then to local disk, each bounded (per chat model on each worker; 0 switches a tier off).
    host_cache_mb: Annotated[float, Field(ge=0)] = 1024
    disk_cache_mb: Annotated[float, Field(ge=0)] = 4096
    # Where the disk tier writes (each worker in its own private subdirectory); default: under the temp directory.
    disk_dir: Annotated[str, Field(min_length=1)] | None = None
    # When a tier is full, a key holding more than this share of it loses its states first (fair share).
    key_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    # Where the registry keeps sessions and placements: `memory` (one registry process) or the URL of a
    # Redis-protocol server (redis://, rediss://, unix://) that several registries share (docs/operations.md).
    store: str = "memory"
    # Prefix of every key in a shared store, so that several deployments can use one server.
    store_key_prefix: Annotated[str, Field(min_length=1)] = "ark:"
    # Stored objects of /v1/responses and /v1/conversations (docs/sessions.md#stored-responses): how long they are
    # kept (OpenAI keeps 30 days), and how many of each kind one API key may hold (beyond: 429 insufficient_quota).
    stored_retention_seconds: Annotated[int, Field(gt=0)] = 30 * 86400
    max_stored_per_api_key: Annotated[int, Field(gt=0)] = 10000

    @field_validator("store")
    @classmethod
    def _store_is_memory_or_a_redis_url(cls, value: str) -> str:
        url = urlsplit(value)
        if (
            value == "memory"
            or (url.scheme in ("redis", "rediss") and url.hostname)
            or (url.scheme == "unix" and url.path)
        ):
            return value
        raise ValueError("must be `memory` or a redis://host:port, rediss://host:port or unix:///path URL")


class StructuredOutputLimits(_Strict):
    """Bounds on output constraints (`response_format` schemas and tool parameters); beyond them, a 400 naming the
    keyword before anything is compiled. The defaults admit every schema OpenAI's structured outputs accepts."""

    max_schema_bytes: Annotated[int, Field(gt=0)] = 65536
    # Nesting of subschemas (properties, items, anyOf, …) below the root.
    max_depth: Annotated[int, Field(gt=0, le=256)] = 32
    max_properties: Annotated[int, Field(gt=0)] = 5000
    # Enum values in one schema, all enums added up.
    max_enum_values: Annotated[int, Field(gt=0)] = 1000
    # Largest minLength / maxLength, and largest minItems / maxItems.
    max_length_bound: Annotated[int, Field(gt=0)] = 10000
    max_items_bound: Annotated[int, Field(gt=0)] = 256
    max_pattern_length: Annotated[int, Field(gt=0)] = 1000
    # Largest count in a pattern's `{m,n}`.
    max_repetition: Annotated[int, Field(gt=0)] = 1000
    # Compiling runs in a child process under these bounds; past them, a 400.
    compile_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 2.0
    compile_memory_mb: Annotated[int, Field(ge=64)] = 1024
    # llguidance's own bounds on a compiled grammar: lexer states (1-2 kB each) and grammar symbols.
    max_grammar_states: Annotated[int, Field(gt=0)] = 50_000
    max_grammar_symbols: Annotated[int, Field(gt=0)] = 200_000
    # Compiled grammars kept per model (LRU), keyed by the grammar's hash.
    cache_size: Annotated[int, Field(gt=0)] = 256
    # Tool calls one assistant turn may make when `parallel_tool_calls` is not false.
    max_parallel_tool_calls: Annotated[int, Field(gt=0, le=128)] = 8


class LimitsConfig(_Strict):
    """Request limits; each exceeded limit is a 400 or 413 naming it."""

    max_body_bytes: Annotated[int, Field(gt=0)] = 4 * 1024 * 1024
    max_messages: Annotated[int, Field(gt=0)] = 512
    max_tokens: Annotated[int, Field(gt=0)] = 4096
    max_stop_sequences: Annotated[int, Field(gt=0)] = 4
    max_n: Annotated[int, Field(gt=0)] = 8
    max_audio_bytes: Annotated[int, Field(gt=0)] = 25 * 1024 * 1024
    max_audio_seconds: Annotated[float, Field(gt=0)] = 1800.0
    max_embedding_inputs: Annotated[int, Field(gt=0)] = 2048
    max_embedding_tokens: Annotated[int, Field(gt=0)] = 300_000
    structured_output: StructuredOutputLimits = StructuredOutputLimits()
    # A request that would wait longer than this for a chat, embeddings or transcription engine (by the queue
    # ahead of it and the recent time per request or per token) is refused at once with 429 and Retry-After; none
    # waits longer than this. The default stays well inside what clients wait (the OpenAI SDKs: 600 s) and below the
    # edge's `first_event_timeout_seconds`.
    max_queue_wait_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Request line plus headers of one request, and the number of headers, enforced by Envoy and by the edge's own
    # HTTP server (past either: 431). Envoy's maximum is 8 MiB.
    max_header_bytes: Annotated[int, Field(ge=4096, le=8 * 1024 * 1024)] = 64 * 1024
    max_headers: Annotated[int, Field(ge=16, le=10_000)] = 100


# `workers: auto` (and `metrics_ports: auto`): this many workers on loopback, from these ports up.
AUTO_WORKER_HOST = "127.0.0.1"
AUTO_FIRST_WORKER_PORT = 50051
AUTO_FIRST_METRICS_PORT = 9151


class ChatServiceConfig(_Strict):
    """Chat workers: each address is one worker process."""

    # `auto`: as many as suit this machine's cores (services/common/cpu.py), on 127.0.0.1:50051 and up.
    workers: Annotated[list[str], Field(min_length=1)] = ["127.0.0.1:50051"]
    # Requests waiting for a slot on one worker before new ones get RESOURCE_EXHAUSTED (HTTP 429).
    max_queue: Annotated[int, Field(ge=0)] = 64
    # Prometheus port of each worker, in the order of `workers` (empty: no metrics endpoint; `auto`: 9151 and up).
    metrics_ports: list[Annotated[int, Field(gt=0, le=65535)]] = []

    @model_validator(mode="before")
    @classmethod
    def _auto_workers(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if raw.get("workers") == "auto":
            raw["workers"] = [f"{AUTO_WORKER_HOST}:{AUTO_FIRST_WORKER_PORT + i}" for i in range(auto_workers())]
        if raw.get("metrics_ports") == "auto":
            count = len(raw["workers"]) if isinstance(raw.get("workers"), list) else 1
            raw["metrics_ports"] = [AUTO_FIRST_METRICS_PORT + i for i in range(count)]
        return raw

    @model_validator(mode="after")
    def _one_metrics_port_per_worker(self) -> ChatServiceConfig:
        if self.metrics_ports and len(self.metrics_ports) != len(self.workers):
            raise ValueError(f"metrics_ports has {len(self.metrics_ports)} ports for {len(self.workers)} workers")
        return self


class ServiceAddress(_Strict):
    address: str
    # Port of the service's Prometheus endpoint (None: no metrics endpoint).
    metrics_port: Annotated[int, Field(gt=0, le=65535)] | None = None


class ServicesConfig(_Strict):
    registry: ServiceAddress = ServiceAddress(address="127.0.0.1:50050")
    chat: ChatServiceConfig = ChatServiceConfig()
    embeddings: ServiceAddress = ServiceAddress(address="127.0.0.1:50061")
    transcription: ServiceAddress = ServiceAddress(address="127.0.0.1:50071")
    # A shared secret every internal gRPC call carries and every service checks (health checks excepted); None: off.
    # `ark up` generates one per run; containers read it from a secret (docs/operations.md, "Trust boundary").
    internal_token: Annotated[str, Field(min_length=16)] | None = None

    @field_validator("internal_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return value or None  # `ARK__SERVICES__INTERNAL_TOKEN=` (compose's default) means no token

    @field_validator("registry", "chat", "embeddings", "transcription", mode="after")
    @classmethod
    def _addresses_have_ports(cls, value: Any) -> Any:
        addresses = value.workers if isinstance(value, ChatServiceConfig) else [value.address]
        for address in addresses:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"address {address!r} must be host:port")
        return value


class EdgeConfig(_Strict):
    """The HTTP edge (FastAPI): behind Envoy, on an internal port that stays reachable for in-cluster clients."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # Marks the session cookie `Secure`; set when clients reach ARK over TLS (implied by `envoy.tls`).
    tls: bool = False
    # On SIGTERM, how long in-flight requests (long streams) may run on before they are ended with an error event.
    drain_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # Failure detection of chat workers (docs/operations.md): each worker's gRPC health is probed this often, each
    # probe waiting at most `worker_probe_timeout_seconds`; a worker whose probes fail is not routed to until one
    # succeeds, and once they have failed for `worker_hang_seconds` its streams end with an error event.
    worker_probe_interval_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    worker_probe_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 2.0
    worker_hang_seconds: Annotated[float, Field(gt=0, le=600)] = 5.0
    # Longest wait for a worker to start a generation (its queue and the prompt's tokenising included): above
    # `limits.max_queue_wait_seconds`, which refuses sooner when a worker is merely busy.
    first_event_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # Longest silence between two messages of a running generation (a long prompt's prefill included).
    event_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # A request that was being processed when its worker died is refused for this long (it may be what killed it).
    quarantine_seconds: Annotated[float, Field(ge=0, le=86400)] = 300.0
    # After a chat worker or the embeddings service refuses a request for load, the edge refuses new requests for
    # it itself (429, no round trip) for this long at most, or less when the backend's Retry-After is shorter: a
    # burst is refused in well under a millisecond per request, and a request still reaches the backend every so
    # often to learn when it has room again. 0 turns this off. (Transcription is held for its whole Retry-After:
    # forwarding an upload costs far more than the round trip.)
    overload_hold_seconds: Annotated[float, Field(ge=0, le=60)] = 0.25


class RateLimitConfig(_Strict):
    """Envoy's local rate limit on `/v1`: a token bucket per Envoy instance; past it, 429 with `Retry-After`."""

    enabled: bool = True
    # The bucket holds `burst` requests and regains `requests_per_fill` of them every `fill_interval_seconds`.
    burst: Annotated[int, Field(gt=0)] = 2000
    requests_per_fill: Annotated[int, Field(gt=0)] = 1000
    fill_interval_seconds: Annotated[float, Field(ge=0.05, le=86400)] = 1.0


class TlsConfig(_Strict):
    """A certificate chain and key in PEM files, read by Envoy."""

    cert_path: str = Field(min_length=1)
    key_path: str = Field(min_length=1)


class EnvoyConfig(_Strict):
    """Envoy, the public front door: TLS, routing to the edge, local rate limit, access log, edge health checks."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # Envoy's admin interface (stats, /ready); keep it on loopback: it can also stop Envoy.
    admin_host: str = "127.0.0.1"
    admin_port: Annotated[int, Field(gt=0, le=65535)] = 9901
    # Where Envoy reaches the edge (host:port); default: edge.host:edge.port, loopback if the edge binds all addresses.
    edge_address: str | None = Field(default=None, pattern=r"^[^:\s]+:\d+$")
    # A stream with no bytes either way for this long is reset; there is no total timeout (long generations).
    idle_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0
    health_check_interval_seconds: Annotated[float, Field(gt=0, le=300)] = 5.0
    rate_limit: RateLimitConfig = RateLimitConfig()
    tls: TlsConfig | None = None


class AuthConfig(_Strict):
    """Accepted API keys. Empty means: generate a development key at start-up (the launcher prints it)."""

    api_keys: list[Annotated[str, Field(min_length=8)]] = []


class ArkConfig(_Strict):
    """The whole configuration."""

    models: Annotated[list[ModelConfig], Field(min_length=1)]
    auth: AuthConfig = AuthConfig()
    sessions: SessionsConfig = SessionsConfig()
    limits: LimitsConfig = LimitsConfig()
    services: ServicesConfig = ServicesConfig()
    edge: EdgeConfig = EdgeConfig()
    envoy: EnvoyConfig = EnvoyConfig()

    @model_validator(mode="before")
    @classmethod
    def _tls_at_envoy_means_secure_cookies(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("envoy"), dict) and raw["envoy"].get("tls"):
            edge = raw.get("edge") if isinstance(raw.get("edge"), dict) else {}
            raw = {**raw, "edge": {**edge, "tls": True}}  # clients reach ARK over HTTPS
        return raw

    @model_validator(mode="after")
    def _names_are_unique(self) -> ArkConfig:
        seen: dict[str, str] = {}
        for i, model in enumerate(self.models):
            for name in (model.id, *model.aliases):
                if name in seen:
                    raise ValueError(f"models.{i}: name {name!r} is already used by model {seen[name]!r}")
                seen[name] = model.id
        return self

    def models_for(self, capability: Capability) -> list[ModelConfig]:
        return [m for m in self.models if m.capability is capability]


def api_key_hash(key: str) -> str:
    """Stable, non-reversible identity of an API key (sessions and caches are bound to it)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _set_path(tree: dict, path: list[str], value: str) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = yaml.safe_load(value) if value else value


def _apply_env(raw: dict, env: Mapping[str, str]) -> dict:
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX):
            _set_path(raw, [p.lower() for p in name.removeprefix(ENV_PREFIX).split("__")], value)
    if env.get("ARK_API_KEY"):
        raw.setdefault("auth", {})["api_keys"] = [env["ARK_API_KEY"]]
    if env.get("ARK_PORT"):
        # The public port: Envoy's, or the edge's when Envoy is switched off.
        envoy = raw.get("envoy")
        public = "edge" if isinstance(envoy, dict) and envoy.get("enabled") is False else "envoy"
        raw.setdefault(public, {})["port"] = env["ARK_PORT"]
    return raw


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> ArkConfig:
    """Read, override and validate the configuration, every model's engine settings included (before any model
    loads); raises ConfigError naming each bad field."""
    env = os.environ if env is None else env
    source = Path(path or env.get("ARK_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {source}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration {source} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"configuration {source} must be a mapping")
    try:
        config = ArkConfig.model_validate(_apply_env(raw, env))
    except ValidationError as exc:
        raise config_error(exc, source=str(source)) from None
    problems = []
    for model in config.models:
        try:
            engine_settings(model)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError("\n  ".join([f"invalid configuration in {source}:", *problems]), problems)
    return config
