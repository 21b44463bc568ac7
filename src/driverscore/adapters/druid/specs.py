"""Kafka supervisor specs: the scores and alerts topics into Druid datasources.

- **trips** (``store.druid.trips_datasource``): one row per message of the scores topic,
  no rollup, ``__time`` = the trip's end. A trip published twice is two rows; the query
  set takes the latest per trip (``LATEST_BY(…, scored_at)``), so duplicates never change
  an answer.
- **alerts** (``store.druid.alerts_datasource``): the same, from the alerts topic, plus
  the ``alert`` text.
- **hourly** (``store.druid.hourly_datasource``): the scores topic rolled up per hour of
  trip end and fleet, client, vehicle, model version, role and band: record count, sums
  of score, km and distance-weighted score, and an approximate distinct trip count
  (``hyperUnique`` of vehicle/trip). For dashboards over long periods; rollup cannot drop
  a duplicate, so its record counts and sums include trips published twice (the trip
  count does not), and the query set does not read it.

Times arrive as ISO-8601 text; ``start_ts`` and ``scored_at`` are kept as epoch
milliseconds (``start_ts_ms``, ``scored_at_ms``). ``reasons`` (a JSON list) is kept as one
string, the lines joined by a newline in their order (Druid's multi-value strings would
sort them).
"""

from __future__ import annotations

from typing import Any, Final

from driverscore.settings import DruidConfig, KafkaConfig

__all__ = ["supervisor_specs"]

_STRING_DIMENSIONS: Final = (
    "vehicle_id",
    "trip_id",
    "driver_id",
    "fleet_id",
    "client_id",
    "risk_band",
    "reasons",
    "model_name",
    "model_version",
    "model_role",
    "event_source",
)
_LONG_DIMENSIONS: Final = (
    "start_ts_ms",
    "scored_at_ms",
    "ping_count",
    "hard_brake_count",
    "harsh_accel_count",
    "harsh_corner_count",
    "stop_count",
)
_DOUBLE_DIMENSIONS: Final = (
    "distance_km",
    "duration_s",
    "score",
    "risk_probability",
    "avg_speed_kmh",
    "max_speed_kmh",
    "p95_speed_kmh",
    "speed_std_kmh",
    "hard_brake_per_100km",
    "harsh_accel_per_100km",
    "harsh_corner_per_100km",
    "speeding_share",
    "night_share",
    "idle_share",
    "jerk_rms_mps3",
)

_TRANSFORMS: Final = [
    {"type": "expression", "name": "start_ts_ms", "expression": "timestamp_parse(start_ts)"},
    {"type": "expression", "name": "scored_at_ms", "expression": "timestamp_parse(scored_at)"},
    {"type": "expression", "name": "reasons", "expression": "array_to_string(reasons, '\n')"},
]
_WEIGHT: Final = "max(nvl(distance_km, 0.0), 0.0)"


def _io(topic: str, kafka: KafkaConfig) -> dict[str, Any]:
    return {
        "type": "kafka",
        "topic": topic,
        "inputFormat": {"type": "json"},
        "consumerProperties": {
            "bootstrap.servers": kafka.bootstrap_servers,
            # The stream's exactly-once outputs become visible at their commit.
            "isolation.level": "read_committed",
        },
        "useEarliestOffset": True,
        "taskCount": 1,
        "replicas": 1,
        "taskDuration": "PT1H",
        "completionTimeout": "PT30M",
    }


def _tuning() -> dict[str, Any]:
    # Small: the local Druid runs every task inside one indexer with a 512 MB heap.
    return {"type": "kafka", "maxRowsInMemory": 50_000, "maxBytesInMemory": 32_000_000}


def _trip_level(
    datasource: str, topic: str, kafka: KafkaConfig, extra: tuple[str, ...]
) -> dict[str, Any]:
    dimensions: list[Any] = [*_STRING_DIMENSIONS, *extra]
    dimensions += [{"type": "long", "name": name} for name in _LONG_DIMENSIONS]
    dimensions += [{"type": "double", "name": name} for name in _DOUBLE_DIMENSIONS]
    return {
        "type": "kafka",
        "spec": {
            "dataSchema": {
                "dataSource": datasource,
                "timestampSpec": {"column": "end_ts", "format": "iso"},
                "dimensionsSpec": {"dimensions": dimensions},
                "transformSpec": {"transforms": _TRANSFORMS},
                "granularitySpec": {
                    "type": "uniform",
                    "segmentGranularity": "DAY",
                    "queryGranularity": "NONE",
                    "rollup": False,
                },
            },
            "ioConfig": _io(topic, kafka),
            "tuningConfig": _tuning(),
        },
    }


def _hourly(datasource: str, topic: str, kafka: KafkaConfig) -> dict[str, Any]:
    return {
        "type": "kafka",
        "spec": {
            "dataSchema": {
                "dataSource": datasource,
                "timestampSpec": {"column": "end_ts", "format": "iso"},
                "dimensionsSpec": {
                    "dimensions": [
                        "fleet_id",
                        "client_id",
                        "vehicle_id",
                        "model_version",
                        "model_role",
                        "risk_band",
                    ]
                },
                "transformSpec": {
                    "transforms": [
                        {"type": "expression", "name": "weight_km", "expression": _WEIGHT},
                        {
                            "type": "expression",
                            "name": "weighted_score",
                            "expression": f"score * {_WEIGHT}",
                        },
                        {
                            "type": "expression",
                            "name": "trip_key",
                            "expression": "concat(vehicle_id, '/', trip_id)",
                        },
                    ]
                },
                "metricsSpec": [
                    {"type": "count", "name": "records"},
                    {"type": "doubleSum", "name": "score_sum", "fieldName": "score"},
                    {"type": "doubleSum", "name": "distance_km", "fieldName": "distance_km"},
                    {"type": "doubleSum", "name": "weight_km", "fieldName": "weight_km"},
                    {
                        "type": "doubleSum",
                        "name": "weighted_score_sum",
                        "fieldName": "weighted_score",
                    },
                    {"type": "doubleMin", "name": "score_min", "fieldName": "score"},
                    {"type": "doubleMax", "name": "score_max", "fieldName": "score"},
                    {"type": "hyperUnique", "name": "trips", "fieldName": "trip_key"},
                ],
                "granularitySpec": {
                    "type": "uniform",
                    "segmentGranularity": "DAY",
                    "queryGranularity": "HOUR",
                    "rollup": True,
                },
            },
            "ioConfig": _io(topic, kafka),
            "tuningConfig": _tuning(),
        },
    }


def supervisor_specs(druid: DruidConfig, kafka: KafkaConfig) -> list[dict[str, Any]]:
    """The three supervisors (trips, alerts, hourly rollup) for ``kafka``'s topics."""
    topics = kafka.topics
    return [
        _trip_level(druid.trips_datasource, topics.scores, kafka, ()),
        _trip_level(druid.alerts_datasource, topics.alerts, kafka, ("alert",)),
        _hourly(druid.hourly_datasource, topics.scores, kafka),
    ]
