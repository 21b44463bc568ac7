"""Kubernetes manifests and the Dockerfile of the scoring service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "k8s" / "service.yaml"
#: The oldest Kubernetes the manifests promise to work on, and the newest schema shipped.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    kinds = []
    for document in _documents():
        kubernetes_validate.validate(document, version, strict=True)
        kinds.append(document["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(kinds)


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
