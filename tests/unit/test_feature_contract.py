"""The feature contract: computed features meet it, the docs and the REST schema follow it."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from driverscore.domain.feature_contract import (
    FEATURE_CONTRACT,
    feature_problem,
    feature_table_markdown,
)
from driverscore.domain.features import FEATURE_SCHEMA, MODEL_FEATURES
from driverscore.services.api.schemas import TripFeaturesIn, TripFeaturesOut

DOCS = Path(__file__).resolve().parents[2] / "docs" / "features.md"


def test_docs_table_is_the_contract() -> None:
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(
        r"<!-- feature-contract:start -->\n(.*?)<!-- feature-contract:end -->", text, re.S
    )
    assert match is not None, "docs/features.md lost its feature contract table"
    assert match.group(1) == feature_table_markdown()


def test_every_numeric_feature_and_model_input_has_a_contract() -> None:
    numeric = {name for name, dtype in FEATURE_SCHEMA.items() if dtype.is_numeric()}
    assert set(FEATURE_CONTRACT) == numeric
    assert set(MODEL_FEATURES) <= set(FEATURE_CONTRACT)


def test_rest_schema_takes_its_ranges_and_units_from_the_contract() -> None:
    for name, field in TripFeaturesIn.model_fields.items():
        if name in ("start_ts", "end_ts"):
            continue
        spec = FEATURE_CONTRACT[name]
        assert spec.description in (field.description or ""), name
        bounds = {type(m).__name__: m for m in field.metadata}
        assert bounds["Ge"].ge == spec.minimum and bounds["Le"].le == spec.maximum, name
        nullable = "None" in str(field.annotation)
        assert nullable == spec.nullable, name
    assert set(TripFeaturesIn.model_fields) - {"start_ts", "end_ts"} == set(MODEL_FEATURES)
    assert set(TripFeaturesOut.model_fields) == set(FEATURE_CONTRACT) | {"event_source"}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0.5, None),
        (None, None),
        (-0.1, "-0.1 is below 0"),
        (1.5, "1.5 is above 1"),
        (float("inf"), "inf is not a finite number"),
    ],
)
def test_share_values(value: float | None, problem: str | None) -> None:
    assert feature_problem(FEATURE_CONTRACT["speeding_share"], value) == problem


def test_a_required_feature_may_not_be_missing() -> None:
    assert feature_problem(FEATURE_CONTRACT["distance_km"], None) == (
        "missing (a number is required)"
    )
    assert feature_problem(FEATURE_CONTRACT["distance_km"], float("nan")) is not None


def test_computed_features_meet_the_contract() -> None:
    """Features of simulated fleet trips (GPS-only and IMU) are all valid."""
    from datetime import UTC, datetime

    from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
    from driverscore.domain.prepare import prepare_trips
    from driverscore.simulation.config import SimulationConfig
    from driverscore.simulation.simulator import simulate

    fleet = simulate(SimulationConfig(vehicles=6, days=2, seed=3, imu_share=0.5))
    features = prepare_trips(
        fleet.pings,
        CleaningConfig(),
        TripConfig(),
        FeatureConfig(),
        datetime(2030, 1, 1, tzinfo=UTC),
    ).features
    assert features.height > 10
    problems = [
        (row["trip_id"], name, problem)
        for row in features.iter_rows(named=True)
        for name, spec in FEATURE_CONTRACT.items()
        if (problem := feature_problem(spec, row[name])) is not None
    ]
    assert problems == []
    assert isinstance(features, pl.DataFrame)
