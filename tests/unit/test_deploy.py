"""Deployment artefacts, validated without a container daemon or a cluster: the generated Envoy configuration by
`envoy --mode validate`, deploy/compose.yaml against the Compose schema plus its topology, and the Kubernetes
manifests structurally (probes, grace periods, selectors, the configuration they carry)."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.common.config import ArkConfig, load_config
from services.launcher.envoy_config import envoy_binary, render, to_dict

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# The Compose Specification's JSON Schema: beside the checkout where ../shared is present, else the copy that
# check-jsonschema (pinned in pyproject's dev extra) vendors from the same repository (compose-spec/compose-spec).
SHARED_COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
KUBERNETES = DEPLOY / "kubernetes"
KEY = {"ARK_API_KEY": "sk-test-12345678"}


def envoy_validate(config: ArkConfig, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render(config))
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def route(config: ArkConfig, name: str) -> dict[str, Any]:
    listener = to_dict(config)["staticResources"]["listeners"][0]
    manager = listener["filterChains"][0]["filters"][0]["typedConfig"]
    return next(r for r in manager["routeConfig"]["virtualHosts"][0]["routes"] if r["name"] == name)


# -- Envoy ----------------------------------------------------------------------------------------------------------


def test_the_default_envoy_config_validates(tmp_path):
    envoy_validate(load_config(env={}), tmp_path)


def test_envoy_config_with_tls_and_without_rate_limit_validates(tmp_path):
    assert shutil.which("openssl"), "openssl makes the test certificate: `make test` installs it (apt-get)"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    subprocess.run(
        [*openssl, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    env = {"ARK__ENVOY__TLS": f"{{cert_path: {cert}, key_path: {key}}}", "ARK__ENVOY__RATE_LIMIT__ENABLED": "false"}
    config = load_config(env=env)
    assert config.edge.tls, "TLS at Envoy makes session cookies Secure"
    envoy_validate(config, tmp_path)
    chain = to_dict(config)["staticResources"]["listeners"][0]["filterChains"][0]
    assert chain["transportSocket"]["name"] == "envoy.transport_sockets.tls"
    assert "typedPerFilterConfig" not in route(config, "api")


def test_envoy_reaches_a_named_edge_through_dns(tmp_path):
    config = load_config(env={"ARK__ENVOY__EDGE_ADDRESS": "edge:8000", "ARK__ENVOY__HOST": "0.0.0.0"})
    cluster = to_dict(config)["staticResources"]["clusters"][0]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"] == {
        "address": "edge",
        "portValue": 8000,
    }
    envoy_validate(config, tmp_path)


def test_outlier_detection_keys_are_envoys_json_names():
    """betterproto2 would write `consecutive5Xx`, which Envoy rejects as an unknown field."""
    outlier = to_dict(load_config(env={}))["staticResources"]["clusters"][0]["outlierDetection"]
    assert "consecutive5xx" in outlier and "consecutive5Xx" not in json.dumps(outlier)


def test_streams_have_no_route_timeout_only_idle_timeouts():
    config = load_config(env={"ARK__ENVOY__IDLE_TIMEOUT_SECONDS": "120"})
    api = route(config, "api")
    assert api["match"] == {"pathSeparatedPrefix": "/v1"}
    assert api["route"]["timeout"] == "0s" and api["route"]["idleTimeout"] == "120s"
    manager = to_dict(config)["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    assert manager["streamIdleTimeout"] == "120s"
    assert "envoy.access_loggers.stdout" in json.dumps(manager["accessLog"])


def manager_of(config: ArkConfig) -> dict[str, Any]:
    return to_dict(config)["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]


def test_envoy_bounds_request_headers_by_the_configured_limits():
    manager = manager_of(load_config(env={"ARK__LIMITS__MAX_HEADER_BYTES": "20000", "ARK__LIMITS__MAX_HEADERS": "50"}))
    assert manager["maxRequestHeadersKb"] == 20  # rounded up to whole KiB
    assert manager["commonHttpProtocolOptions"]["maxHeadersCount"] == 50


def test_the_edges_request_id_is_the_one_clients_see():
    assert manager_of(load_config(env={}))["generateRequestId"] is False  # Envoy's would replace the edge's req_…


@pytest.mark.parametrize(
    ("status", "code", "retry"),
    [
        (404, "unknown_url", "false"),
        (413, "request_too_large", "false"),
        (431, "request_too_large", "false"),
        (429, "rate_limit_exceeded", "true"),
        (503, "service_unavailable", "true"),
        (504, "timeout", "true"),
    ],
)
def test_envoys_own_replies_use_openais_envelope_request_id_and_retry_hint(status, code, retry):
    mappers = manager_of(load_config(env={}))["localReplyConfig"]["mappers"]
    mapper = next(
        m for m in mappers if m["filter"]["statusCodeFilter"]["comparison"]["value"]["defaultValue"] == status
    )
    assert mapper["bodyFormatOverride"]["jsonFormat"]["error"]["code"] == code
    headers = {h["header"]["key"]: h["header"]["value"] for h in mapper["headersToAdd"]}
    assert headers["x-request-id"] == "%UNIQUE_ID%"
    assert headers["x-should-retry"] == retry


def test_the_rate_limit_answers_in_openais_envelope_with_retry_after():
    env = {
        "ARK__ENVOY__RATE_LIMIT__BURST": "5",
        "ARK__ENVOY__RATE_LIMIT__REQUESTS_PER_FILL": "2",
        "ARK__ENVOY__RATE_LIMIT__FILL_INTERVAL_SECONDS": "2.5",
    }
    config = load_config(env=env)
    limit = route(config, "api")["typedPerFilterConfig"]["envoy.filters.http.local_ratelimit"]
    assert limit["tokenBucket"] == {"maxTokens": 5, "tokensPerFill": 2, "fillInterval": "2.500s"}
    assert limit["responseHeadersToAdd"] == [{"header": {"key": "retry-after", "value": "3"}}]
    manager = to_dict(config)["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    mapper = manager["localReplyConfig"]["mappers"][0]
    assert mapper["filter"]["statusCodeFilter"]["comparison"]["value"]["defaultValue"] == 429
    assert mapper["bodyFormatOverride"]["jsonFormat"]["error"] == {
        "message": "Rate limit reached for requests. Retry after the time in Retry-After.",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }


# -- compose ----------------------------------------------------------------------------------------------------------

SERVICES = {
    "envoy",
    "edge-1",
    "edge-2",
    "registry-1",
    "registry-2",
    "valkey",
    "chat-1",
    "chat-2",
    "embeddings",
    "transcription",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as its process would see it, with compose's `${VAR:-default}` resolved."""
    env = {}
    for name, value in service["environment"].items():
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
        env[name] = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "sk-compose-12345678", value)
    env["ARK_CONFIG"] = env["ARK_CONFIG"].replace("/app/deploy", str(DEPLOY))
    return env


def compose_schema() -> dict[str, Any]:
    if SHARED_COMPOSE_SCHEMA.is_file():
        return json.loads(SHARED_COMPOSE_SCHEMA.read_text())
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(vendored.read_text(encoding="utf-8"))


def test_compose_file_follows_the_compose_schema(compose):
    schema = compose_schema()
    # The dialect the schema declares: draft-07 in ../shared, 2020-12 in check-jsonschema's copy.
    dialect = jsonschema.Draft7Validator if "draft-07" in schema["$schema"] else jsonschema.Draft202012Validator
    validator = dialect(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    # The schema does catch mistakes: a misspelt key fails it.
    edge = compose["services"]["edge-1"]
    broken = {**compose, "services": {**compose["services"], "edge-1": {**edge, "helthcheck": {}}}}
    assert any(validator.iter_errors(broken))


def test_compose_has_the_scaled_topology(compose):
    services = compose["services"]
    cpu = {name for name, s in services.items() if "gpu" not in s.get("profiles", [])}
    assert cpu == SERVICES
    assert services["envoy"]["ports"] == ["${ARK_PORT:-8080}:8080"], "Envoy owns the public port"
    assert services["edge-1"]["ports"] == ["127.0.0.1:${ARK_EDGE_PORT:-8000}:8000"], "an edge stays reachable"
    for edge in ("edge-1", "edge-2"):
        assert services["envoy"]["depends_on"][edge]["condition"] == "service_healthy"
    for name, service in services.items():
        probe = ["CMD", "valkey-cli", "ping"] if name == "valkey" else ["CMD", "ark", "probe"]
        assert service["healthcheck"]["test"][:3] == probe, name
    assert (DEPLOY / ".env").read_text().count("COMPOSE_PROFILES=cpu") == 1


def test_every_compose_service_gets_a_valid_configuration_and_envoy_validates(compose, tmp_path):
    for name, service in compose["services"].items():
        if name == "valkey":
            continue
        config = load_config(env=compose_env(service))
        address = next((a for a in service["command"] if re.fullmatch(r"[\w.-]+:\d+", a)), None)
        if address is not None:  # what a gRPC service listens on is where the others look for it
            host, port = address.split(":")
            configured = {
                "registry-1": [config.services.registry.address],
                "registry-2": [config.services.registry.address],
                "embeddings": [config.services.embeddings.address],
                "transcription": [config.services.transcription.address],
            }.get(name.removesuffix("-gpu"), config.services.chat.workers)
            assert any(c.endswith(f":{port}") and (host in c or host == "0.0.0.0") for c in configured), name
    envoy_validate(load_config(env=compose_env(compose["services"]["envoy"])), tmp_path)


def test_compose_grace_periods_cover_the_drain(compose):
    config = load_config(env=compose_env(compose["services"]["edge-1"]))
    for name in ("envoy", "edge-1", "edge-2", "chat-1", "chat-2"):
        grace = int(compose["services"][name]["stop_grace_period"].removesuffix("s"))
        assert grace > config.edge.drain_grace_seconds, name


def test_replicas_share_one_name_and_the_registries_share_one_store(compose):
    services = compose["services"]
    for alias, replicas in {"edge": ("edge-1", "edge-2"), "registry": ("registry-1", "registry-2")}.items():
        for name in replicas:
            assert services[name]["networks"]["default"]["aliases"] == [alias], name
    envs = [compose_env(s) for n, s in services.items() if n != "valkey"]
    configs = [load_config(env=env) for env in envs]
    assert {c.sessions.store for c in configs} == {"redis://valkey:6379/0"}
    # gRPC resolves the alias to every registry and balances over them (edge/clients/registry.py).
    assert {c.services.registry.address for c in configs} == {"dns:///registry:50050"}
    assert load_config(env=compose_env(services["envoy"])).envoy.edge_address == "edge:8000"
    for name in ("registry-1", "registry-2"):
        assert services[name]["depends_on"]["valkey"]["condition"] == "service_healthy"
    valkey = services["valkey"]
    assert "--appendonly" in valkey["command"] and valkey["volumes"] == ["valkey-data:/data"], "sessions persist"
    assert re.fullmatch(r"valkey/valkey:\d+\.\d+\.\d+", valkey["image"]), "pinned"


def test_the_gpu_profile_selects_tensorrt_llm_engines(compose):
    gpu = {name: s for name, s in compose["services"].items() if "gpu" in s.get("profiles", [])}
    assert set(gpu) == {"chat-1-gpu", "chat-2-gpu", "embeddings-gpu", "transcription-gpu"}
    for name, service in gpu.items():
        assert service["networks"]["default"]["aliases"] == [name.removesuffix("-gpu")]
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        config = load_config(env=compose_env(service))
        assert {m.engine for m in config.models} == {"tensorrt_llm"}, name
    gpu_env = dict(line.split("=", 1) for line in (DEPLOY / "gpu.env").read_text().splitlines() if "=" in line)
    assert gpu_env["COMPOSE_PROFILES"] == "gpu" and gpu_env["ARK_CONFIG_FILE"] == "ark.gpu.yaml"
    cpu_ids = {(m.id, tuple(m.aliases)) for m in load_config(env={}).models}
    assert {(m.id, tuple(m.aliases)) for m in load_config(DEPLOY / "ark.gpu.yaml", env={}).models} == cpu_ids


def test_the_dockerfile_installs_and_generates_stubs_with_the_makefile():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "make install" in dockerfile and "make protos" in dockerfile
    ignored = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "gen", ".run"} <= set(ignored)


# -- Kubernetes -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "every manifest is in kustomization.yaml"
    docs = [d for name in sorted(listed) for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
    return docs


def of_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests if d["kind"] == kind}


@pytest.fixture(scope="module")
def cluster_config(manifests, tmp_path_factory) -> ArkConfig:
    path = tmp_path_factory.mktemp("k8s") / "ark.yaml"
    path.write_text(of_kind(manifests, "ConfigMap")["ark-config"]["data"]["ark.yaml"])
    return load_config(path, env=KEY)


def test_kubernetes_runs_every_component_with_probes(manifests):
    deployments = of_kind(manifests, "Deployment")
    assert set(deployments) == {
        f"ark-{c}" for c in ("envoy", "edge", "registry", "chat", "embeddings", "transcription")
    }
    assert set(of_kind(manifests, "StatefulSet")) == {"ark-valkey"}
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        for container in spec["template"]["spec"]["containers"]:
            assert container["image"] and "readinessProbe" in container and "livenessProbe" in container, name
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                check = container.get(probe, {})
                if "grpc" in check:  # gRPC health, on the port the service listens on
                    assert check["grpc"]["port"] == ports["grpc"], name
                    assert f":{ports['grpc']}" in container["command"][-1], name
                for kind in ("httpGet", "tcpSocket"):
                    if kind in check:
                        assert check[kind]["port"] in ports, name
    edge = deployments["ark-edge"]["spec"]["template"]["spec"]["containers"][0]
    assert (
        edge["readinessProbe"]["httpGet"]["path"] == "/ready" and edge["livenessProbe"]["httpGet"]["path"] == "/health"
    )


def test_kubernetes_services_select_pods_and_ports_that_exist(manifests):
    deployments = of_kind(manifests, "Deployment") | of_kind(manifests, "StatefulSet")
    for name, service in of_kind(manifests, "Service").items():
        matching = [
            d
            for d in deployments.values()
            if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matching, f"Service {name} selects no pods"
        port_names = {
            p["name"] for d in matching for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, name


def test_chat_workers_scale_horizontally_and_register_their_own_address(manifests):
    chat = of_kind(manifests, "Deployment")["ark-chat"]
    hpa = of_kind(manifests, "HorizontalPodAutoscaler")["ark-chat"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ark-chat"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    container = chat["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "$(POD_IP):50051"
    pod_ip = next(e for e in container["env"] if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    headless = of_kind(manifests, "Service")["ark-chat"]
    assert headless["spec"]["clusterIP"] == "None"


def test_registries_and_edges_scale_over_one_valkey(manifests, cluster_config):
    deployments, services = of_kind(manifests, "Deployment"), of_kind(manifests, "Service")
    assert deployments["ark-registry"]["spec"]["replicas"] >= 2 and deployments["ark-edge"]["spec"]["replicas"] >= 2
    assert "strategy" not in deployments["ark-registry"]["spec"], "rolling updates: registries share the store"
    assert services["ark-registry"]["spec"]["clusterIP"] == "None", "clients balance over every registry pod"
    assert cluster_config.services.registry.address == "dns:///ark-registry:50050"
    assert cluster_config.sessions.store == "redis://ark-valkey:6379/0"
    valkey = of_kind(manifests, "StatefulSet")["ark-valkey"]
    assert valkey["spec"]["serviceName"] == "ark-valkey" and "ark-valkey" in services
    [container] = valkey["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"valkey/valkey:\d+\.\d+\.\d+", container["image"]), "pinned"
    assert "--appendonly" in container["command"] and container["volumeMounts"][0]["mountPath"] == "/data"
    assert valkey["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "readinessProbe" in container and "livenessProbe" in container
    ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in services["ark-valkey"]["spec"]["ports"]} <= ports


def test_kubernetes_grace_periods_cover_the_drain(manifests, cluster_config):
    deployments = of_kind(manifests, "Deployment")
    for name in ("ark-edge", "ark-envoy", "ark-chat"):
        grace = deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > cluster_config.edge.drain_grace_seconds + 5, name


def test_the_cluster_configuration_loads_and_points_at_the_services(manifests, cluster_config, tmp_path):
    services = of_kind(manifests, "Service")
    addresses = [
        cluster_config.services.registry.address,
        *cluster_config.services.chat.workers,
        cluster_config.services.embeddings.address,
        cluster_config.services.transcription.address,
        cluster_config.envoy.edge_address,
    ]
    for address in addresses:
        host, port = address.removeprefix("dns:///").split(":")
        assert host in services, address
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, address
    assert [m.id for m in cluster_config.models] == [m.id for m in load_config(env={}).models]
    envoy_validate(cluster_config, tmp_path)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_network_policies_open_only_envoy_to_everyone_and_each_port_to_its_callers(manifests):
    policies = of_kind(manifests, "NetworkPolicy")
    pods = {
        name: d["spec"]["template"]["metadata"]["labels"]
        for name, d in (of_kind(manifests, "Deployment") | of_kind(manifests, "StatefulSet")).items()
    }
    ports = {
        name: {p["name"] for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for name, d in (of_kind(manifests, "Deployment") | of_kind(manifests, "StatefulSet")).items()
    }
    # Every ARK pod is under the default deny: nothing reaches it unless a policy says so.
    deny = policies["ark-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    assert all(_selects(deny["podSelector"], labels) for labels in pods.values())
    allowed: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for name, policy in policies.items():
        if name == "ark-default-deny":
            continue
        selected = [pod for pod, labels in pods.items() if _selects(policy["spec"]["podSelector"], labels)]
        assert selected, f"{name} selects no pods"
        for rule in policy["spec"]["ingress"]:
            for port in rule["ports"]:
                for pod in selected:
                    assert port["port"] in ports[pod], f"{name}: {pod} has no port {port['port']}"
                    allowed.setdefault((pod, port["port"]), []).extend(rule.get("from", [{}]))
    # Only Envoy's port is open to any source; the gRPC ports only to ARK's own pods.
    open_to_all = {key for key, sources in allowed.items() if {} in sources}
    assert open_to_all == {("ark-envoy", "http")}
    callers = {
        "ark-edge": {"ark-envoy"},
        "ark-registry": {"ark-edge", "ark-chat"},
        "ark-chat": {"ark-edge", "ark-registry"},
        "ark-embeddings": {"ark-edge"},
        "ark-transcription": {"ark-edge"},
    }
    for pod, expected in callers.items():
        port = "grpc" if pod != "ark-edge" else "http"
        sources = {
            s["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            for s in allowed[(pod, port)]
            if "podSelector" in s
        }
        assert sources == expected, pod
    assert all("ipBlock" not in s for sources in allowed.values() for s in sources)


def test_every_service_reads_the_internal_token_from_an_optional_secret(manifests):
    for name in ("ark-edge", "ark-registry", "ark-chat", "ark-embeddings", "ark-transcription"):
        container = of_kind(manifests, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        ref = env["ARK__SERVICES__INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "ark-internal-token", "key": "token", "optional": True}, name
