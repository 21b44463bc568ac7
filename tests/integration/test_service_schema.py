"""Property tests of the scoring service against its own OpenAPI schema (Schemathesis).

Schemathesis reads ``/openapi.json`` from the real service (uvicorn, a real MLflow registry
with two registered versions) and sends generated requests - valid and deliberately
invalid - to every route with the bearer token. Whatever it sends, the service must answer
with a 2xx or 4xx: a 5xx means an input reached code that did not expect it.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from test_service import AUTH, FEATURES, TOKEN, Backend, _register_two, _settings, serving

pytestmark = [pytest.mark.integration]

#: Generated requests per route and phase: enough to reach the odd corners of every body
#: (empty lists, boundary numbers, both ping and feature trips) within ~1 minute overall.
_EXAMPLES = 100


@pytest.fixture(scope="module")
def schema_backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    return _register_two(tmp_path_factory.mktemp("schema-mlflow"), "trip-risk-schema")


@pytest.fixture(scope="module")
def service(
    schema_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    # A server of its own: the generated PUT /v1/rollout calls change its split.
    settings_ = _settings(
        tmp_path_factory.mktemp("schema-service"), tokens=[TOKEN], auth="on", max_pings=500
    )
    with serving(settings_, schema_backend.registry) as client:
        assert client.get("/readyz").status_code == 200
        yield client


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(
    service: httpx.Client, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{service.base_url}/openapi.json")
    base_url = str(service.base_url)
    operations = [result.ok() for result in schema.get_all_operations()]
    routes = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/score", "POST /v1/score:batch", "POST /invocations"} <= routes

    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not len(operation.body):
            continue  # no body, no parameters: nothing to make invalid (GET /healthz ...)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=_EXAMPLES,
            deadline=None,
            database=None,
            # Same examples on every run: CI must not fail on a draw no one has seen here.
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def no_server_error(case: Case) -> None:
            case.call_and_validate(base_url=base_url, headers=AUTH, checks=[not_a_server_error])

        no_server_error()


def test_features_beyond_the_model_input_range_get_a_422(service: httpx.Client) -> None:
    # Found by the test above: 1e39 passed validation, overflowed the float32 cast and
    # answered 500. The model's inputs are float32, so larger values are refused by name.
    huge = {**FEATURES, "jerk_rms_mps3": 1e39}
    body = {"vehicle_id": "v-1", "features": huge}
    response = service.post("/v1/score", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["problems"][0]["field"] == "features.jerk_rms_mps3"

    header = ",".join(huge)
    row = ",".join(str(v) for v in huge.values())
    for value in ("1e39", "inf", "nan"):
        csv_body = f"vehicle_id,{header}\nv-1,{row.replace('1e+39', value)}\n"
        response = service.post(
            "/invocations", content=csv_body, headers={**AUTH, "content-type": "text/csv"}
        )
        assert response.status_code == 422, (value, response.text)
        assert response.json()["problems"][0]["field"] == "rows.0.features.jerk_rms_mps3"


def test_times_out_of_range_get_a_422(service: httpx.Client) -> None:
    # Found by the test above: an offset near year 1 or 9999 overflowed the UTC conversion.
    ping = {"ts": "0001-01-01T00:00:00+01:00", "lat": 52.5, "lon": 13.4}
    response = service.post("/v1/score", json={"vehicle_id": "v", "pings": [ping]}, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["problems"][0]["field"] == "pings.0.ts"

    features = {**FEATURES, "start_ts": "9999-12-31T23:59:59-01:00"}
    response = service.post(
        "/v1/score", json={"vehicle_id": "v", "features": features}, headers=AUTH
    )
    assert response.status_code == 422, response.text
    assert response.json()["problems"][0]["field"] == "features.start_ts"
