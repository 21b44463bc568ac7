"""Parameters of the pure domain steps, with their units.

They are plain frozen models so that a trained model version can store the exact values
it was trained with, and every engine (batch, stream, REST) rebuilds the same features.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The cornering rules :func:`~driverscore.domain.features.trip_features` knows. Model
#: cards keep the rule they were trained with (cards of schema 1 predate the choice and
#: get ``heading_step``: see ``ModelCard``).
CorneringRule = Literal["heading_step", "windowed_turn"]

#: What a model card of schema 1 (before the rule choices existed) was computed with.
LEGACY_FEATURE_RULES: Final[dict[str, object]] = {
    "cornering": "heading_step",
    "speed_limit_window_m": 0.0,
}


class CleaningConfig(BaseModel):
    """Rules that decide which pings are kept."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_speed_mps: float = Field(
        90.0, gt=0, description="Reported speeds above this are impossible (m/s)."
    )
    max_implied_speed_mps: float = Field(
        90.0,
        gt=0,
        description=(
            "A fix whose implied speed from both neighbours exceeds this is a GPS jump (m/s)."
        ),
    )
    earliest_ts: str = Field(
        "2000-01-01T00:00:00Z", description="Fixes before this UTC time are bad timestamps."
    )
    max_future_s: float = Field(
        86_400.0,
        ge=0,
        description="Fixes later than the run's reference time plus this are bad timestamps (s).",
    )


class TripConfig(BaseModel):
    """How pings are cut into trips (the rule is in ``domain/trips.py``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gap_s: float = Field(300.0, gt=0, description="A silence longer than this ends a trip (s).")
    min_duration_s: float = Field(60.0, ge=0, description="Shorter trips are set aside (s).")
    min_distance_km: float = Field(0.2, ge=0, description="Shorter trips are set aside (km).")
    min_pings: int = Field(10, ge=2, description="Trips with fewer pings are set aside.")
    max_trip_pings: int = Field(
        50_000,
        ge=2,
        description=(
            "A trip is cut after this many pings (about 14 h at 1 Hz); the next ping starts "
            "its next part. Batch and stream cut at the same count, which bounds stream state."
        ),
    )


class FeatureConfig(BaseModel):
    """Thresholds of the trip features. Defaults follow common telematics practice."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hard_brake_mps2: float = Field(
        3.0,
        gt=0,
        description=(
            "Deceleration at or beyond this is hard braking (m/s²; 3.0 ≈ 0.31 g ≈ 6.7 mph/s)."
        ),
    )
    harsh_accel_mps2: float = Field(
        3.0, gt=0, description="Acceleration at or beyond this is harsh (m/s²)."
    )
    harsh_corner_mps2: float = Field(
        3.0, gt=0, description="Lateral acceleration at or beyond this is harsh (m/s²)."
    )
    max_plausible_accel_mps2: float = Field(
        12.0, gt=0, description="Accelerations beyond this are sensor glitches, not events (m/s²)."
    )
    idle_speed_mps: float = Field(
        0.5, ge=0, description="Below this speed the vehicle is stopped (m/s)."
    )
    min_corner_speed_mps: float = Field(
        5.0, ge=0, description="Cornering from GPS heading is only trusted above this speed (m/s)."
    )
    cornering: CorneringRule = Field(
        "windowed_turn",
        description=(
            "How lateral acceleration is taken from GPS heading: 'windowed_turn' (yaw rate over "
            "a centred window, events need a minimum net turn) or 'heading_step' (speed x the "
            "heading change of one fix, the rule of model cards of schema 1)."
        ),
    )
    corner_window_s: float = Field(
        2.0,
        gt=0,
        description=(
            "Shortest span of the centred window the yaw rate is measured over (s; windowed_turn)."
        ),
    )
    corner_window_s_per_mps: float = Field(
        0.16,
        ge=0,
        description=(
            "The window grows with speed: at least this many seconds per m/s (2.7 s at 60 "
            "km/h, 5.3 s at 120 km/h), so course jitter x speed / window, the noise of the lateral "
            "estimate, is the same at every speed (s per m/s; windowed_turn)."
        ),
    )
    min_corner_turn_deg: float = Field(
        15.0,
        ge=0,
        description=(
            "A cornering event must turn the vehicle by at least this much, measured from two "
            "windows before the event to two windows after it (degrees; windowed_turn)."
        ),
    )
    speeding_tolerance_mps: float = Field(
        2.0,
        ge=0,
        description=(
            "Speed must exceed the posted limit by more than this to count as speeding (m/s)."
        ),
    )
    speed_limit_window_m: float = Field(
        500.0,
        ge=0,
        description=(
            "Speeding is judged against the highest known limit within this much road centred "
            "on the fix, so a wrong (too low) map limit shorter than it does not count (m; 0: "
            "the fix's own limit, the rule of model cards of schema 1)."
        ),
    )
    speeding_moderate_kmh: float = Field(
        10.0, gt=0, description="Margin over the limit for speeding_moderate_share (km/h)."
    )
    speeding_severe_kmh: float = Field(
        20.0, gt=0, description="Margin over the limit for speeding_severe_share (km/h)."
    )
    night_start_hour: float = Field(22.0, ge=0, lt=24, description="Local hour when night starts.")
    night_end_hour: float = Field(5.0, ge=0, lt=24, description="Local hour when night ends.")
    timezone: str | None = Field(
        None,
        description=(
            "IANA zone for local time; when unset, local mean solar time from longitude is used."
        ),
    )
    max_dt_s: float = Field(
        10.0,
        gt=0,
        description="Time steps longer than this (GPS dropouts) are not integrated into rates (s).",
    )
