"""Kubernetes manifests and the Dockerfile of the scoring service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = K8S / "service.yaml"
#: Every manifest shipped: the service, the stream processor and the autoscaling examples.
ALL_MANIFESTS = sorted(K8S.rglob("*.yaml"))
#: The oldest Kubernetes the manifests promise to work on, and the newest schema shipped.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _documents(path: Path = MANIFESTS) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path, kind: str) -> dict[str, Any]:
    (document,) = [d for d in _documents(path) if d["kind"] == kind]
    return document


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", ALL_MANIFESTS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifests_validate_against_kubernetes_schemas(path: Path, version: str) -> None:
    for document in _documents(path):
        kubernetes_validate.validate(document, version, strict=True)


def test_every_component_is_shipped() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for p in ALL_MANIFESTS for d in _documents(p)}
    assert {
        ("Deployment", "driverscore-api"),
        ("Service", "driverscore-api"),
        ("HorizontalPodAutoscaler", "driverscore-api"),
        ("Deployment", "driverscore-stream"),
        ("HorizontalPodAutoscaler", "driverscore-stream"),
        ("ConfigMap", "driverscore-adapter-rules"),
    } <= kinds


def test_validator_rejects_a_broken_manifest() -> None:
    deployment = next(d for d in _documents() if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["port"] = [8080]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_deployment_probes_resources_and_non_root() -> None:
    deployment = next(d for d in _documents() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["args"] == ["serve"]
    hpa = next(d for d in _documents() if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_dockerfile_is_multi_stage_non_root_with_healthcheck_and_serve() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert sum(line.startswith("FROM ") for line in lines) >= 2
    assert any(line.startswith("COPY --from=build") for line in lines)
    user = [line for line in lines if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0"))
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert 'ENTRYPOINT ["driverscore"]' in lines and 'CMD ["serve"]' in lines
    assert "EXPOSE 8080" in lines


def test_stream_replicas_never_outnumber_partitions_and_state_is_writable() -> None:
    deployment = _one(K8S / "stream.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    partitions = int(env["DRIVERSCORE_KAFKA__PARTITIONS"])
    hpa = _one(K8S / "examples" / "stream-hpa-consumer-lag.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert deployment["spec"]["replicas"] <= partitions
    assert hpa["spec"]["maxReplicas"] <= partitions
    # A surge replica during a rollout would be one consumer more than the partitions.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    # The state store lies on a writable volume; the root filesystem is read-only.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    state_dir = Path(env["DRIVERSCORE_KAFKA__STATE_DIR"])
    writable = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
    assert any(state_dir.is_relative_to(mount) for mount in writable)
    # Long enough to commit: well above the commit interval and a broker round trip.
    assert pod["terminationGracePeriodSeconds"] >= 30
    # Probes and the scrape annotations point at the port the processor serves /metrics on.
    args = container["args"]
    port = int(args[args.index("--metrics-port") + 1])
    assert args[0] == "stream"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert pod["securityContext"]["runAsNonRoot"] is True


def adapter_rules() -> dict[str, Any]:
    """prometheus-adapter's configuration shipped in the examples."""
    config = _one(K8S / "examples" / "prometheus-adapter-rules.yaml", "ConfigMap")
    rules: dict[str, Any] = yaml.safe_load(config["data"]["config.yaml"])
    return rules


def adapter_series() -> dict[str, str]:
    """Autoscaling metric name → the series the images must expose on /metrics."""
    rules = adapter_rules()
    out = {}
    for rule in rules["rules"] + rules["externalRules"]:
        series = rule["seriesQuery"].split("{")[0].strip("'\" ")
        out[rule["name"]["as"]] = series
    return out


def test_autoscaling_examples_name_metrics_the_adapter_serves() -> None:
    served = adapter_series()
    api = _one(K8S / "examples" / "service-hpa-request-rate.yaml", "HorizontalPodAutoscaler")
    metrics = api["spec"]["metrics"]
    assert {"type": "Resource"}.items() <= metrics[0].items()  # CPU stays
    pods = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
    assert pods == ["driverscore_requests_per_second"]
    assert served["driverscore_requests_per_second"] == "driverscore_request_seconds_count"
    stream = _one(K8S / "examples" / "stream-hpa-consumer-lag.yaml", "HorizontalPodAutoscaler")
    (external,) = [m["external"]["metric"]["name"] for m in stream["spec"]["metrics"]]
    assert served[external] == "driverscore_stream_consumer_lag"


def test_dockerfile_builds_both_images_on_a_chosen_base() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "ARG BASE=python:3.11-slim" in lines  # the public base stays the default
    stages = [line.split() for line in lines if line.startswith("FROM ")]
    # Every stage starts from the base or from an earlier stage: one base per build.
    names = {s[3] for s in stages}
    assert all(s[1] == "${BASE}" or s[1] in names for s in stages)
    assert {"serving", "runtime"} <= names
    assert stages[-1][3] == "runtime"  # `docker build .` gives the full image
    assert "uv sync --frozen" in text  # installs from the lock
