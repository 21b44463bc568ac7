"""Prometheus metrics of one service instance, in their own collector registry.

Each app gets its own registry (no process-global state), so several apps can live in
one process (tests) and nothing is registered at import.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["ServiceMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ServiceMetrics:
    registry: CollectorRegistry
    latency: Histogram
    errors: Counter
    in_flight: Gauge
    trips_scored: Counter
    trips_set_aside: Counter
    models: Info
    registry_polls: Counter

    @classmethod
    def create(cls) -> ServiceMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            latency=Histogram(
                "driverscore_request_seconds",
                "Request latency by route, status and the model version that answered (s).",
                ["route", "method", "status", "model_version"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            errors=Counter(
                "driverscore_errors",
                "Failed requests by kind (invalid_request, unauthorized, not_ready, ...).",
                ["kind"],
                registry=registry,
            ),
            in_flight=Gauge(
                "driverscore_requests_in_flight", "Requests being served now.", registry=registry
            ),
            trips_scored=Counter(
                "driverscore_trips_scored",
                "Trips scored, by answering role and model version.",
                ["role", "model_version"],
                registry=registry,
            ),
            trips_set_aside=Counter(
                "driverscore_trips_set_aside",
                "Trips not scored, by reason (invalid_features, non_finite_output).",
                ["reason"],
                registry=registry,
            ),
            models=Info(
                "driverscore_models", "Model versions loaded for each role.", registry=registry
            ),
            registry_polls=Counter(
                "driverscore_registry_polls",
                "Registry polls by outcome (unchanged, swapped, failed).",
                ["outcome"],
                registry=registry,
            ),
        )
