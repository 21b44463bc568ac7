"""Request and response bodies of the scoring service, every field with its unit.

Strict: unknown fields, NaN and infinity are refused, so a typo or a broken sensor value
gets a 422 naming the field instead of a silently different score.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from driverscore.domain.feature_contract import FEATURE_CONTRACT, MODEL_INPUT_MAX
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.schema import PING_FIELD_DOCS

__all__ = [
    "BatchScoreRequest",
    "BatchScoreResponse",
    "ErrorResponse",
    "FieldProblem",
    "ModelVersionInfo",
    "ModelsResponse",
    "PingIn",
    "Readiness",
    "TripFeaturesIn",
    "TripFeaturesOut",
    "TripIn",
    "TripScore",
    "ValidationErrorResponse",
]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
_Id = Annotated[str, Field(min_length=1, max_length=200)]
#: Epoch milliseconds: 0 .. year 2500.
_EpochMs = Annotated[int, Field(ge=0, le=16_725_225_600_000)]
_EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST: Final = datetime(2500, 1, 1, tzinfo=UTC)


def _utc_in_range(value: datetime) -> datetime:
    # Near year 1 or 9999 an offset moves the time out of what datetime can hold.
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time out of range (1970 to 2500 UTC)") from None
    if not _EARLIEST <= utc < _LATEST:
        raise ValueError("time out of range (1970 to 2500 UTC)")
    return utc


#: A time with an offset, 1970 to 2500, returned in UTC.
_Time = Annotated[AwareDatetime, AfterValidator(_utc_in_range)]
#: Largest feature value the model takes: its inputs are float32.
_MODEL_MAX = MODEL_INPUT_MAX


class PingIn(BaseModel):
    """One GPS/IMU fix of the trip (SI units, UTC)."""

    model_config = _STRICT

    ts: _Time | _EpochMs = Field(
        description=PING_FIELD_DOCS["ts"] + " Must not decrease from one ping to the next."
    )
    lat: float = Field(ge=-90, le=90, description=PING_FIELD_DOCS["lat"])
    lon: float = Field(ge=-180, le=180, description=PING_FIELD_DOCS["lon"])
    speed_mps: float | None = Field(None, ge=0, description=PING_FIELD_DOCS["speed_mps"])
    heading_deg: float | None = Field(
        None, ge=0, le=360, description=PING_FIELD_DOCS["heading_deg"]
    )
    accel_long_mps2: float | None = Field(
        None, ge=-100, le=100, description=PING_FIELD_DOCS["accel_long_mps2"]
    )
    accel_lat_mps2: float | None = Field(
        None, ge=-100, le=100, description=PING_FIELD_DOCS["accel_lat_mps2"]
    )
    speed_limit_mps: float | None = Field(
        None, ge=0, description=PING_FIELD_DOCS["speed_limit_mps"]
    )


def _feature_in(name: str) -> Any:
    """The request field of a model input, from the feature contract: range and meaning."""
    spec = FEATURE_CONTRACT[name]
    return Field(
        ge=spec.minimum, le=spec.maximum, description=f"{spec.description} Unit: {spec.unit}."
    )


def _feature_out(name: str) -> Any:
    spec = FEATURE_CONTRACT[name]
    return Field(None, description=f"{spec.description} Unit: {spec.unit}.")


class TripFeaturesIn(BaseModel):
    """Precomputed trip features (the model inputs of docs/features.md), per trip.

    Ranges, units and meanings come from the feature contract
    (``domain/feature_contract.py``); a nullable feature must still be present (as null).
    """

    model_config = _STRICT

    distance_km: float = _feature_in("distance_km")
    avg_speed_kmh: float | None = _feature_in("avg_speed_kmh")
    p95_speed_kmh: float | None = _feature_in("p95_speed_kmh")
    speed_std_kmh: float | None = _feature_in("speed_std_kmh")
    hard_brake_per_100km: float = _feature_in("hard_brake_per_100km")
    harsh_accel_per_100km: float = _feature_in("harsh_accel_per_100km")
    harsh_corner_per_100km: float = _feature_in("harsh_corner_per_100km")
    speeding_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description=FEATURE_CONTRACT["speeding_share"].description + " Unit: 0-1.",
    )
    # Required (null when no limit is known): a body without them would be scored as if
    # no limit were known, a silent wrong answer for a trip that has one.
    speeding_moderate_share: float | None = _feature_in("speeding_moderate_share")
    speeding_severe_share: float | None = _feature_in("speeding_severe_share")
    night_share: float | None = _feature_in("night_share")
    idle_share: float | None = _feature_in("idle_share")
    jerk_rms_mps3: float | None = _feature_in("jerk_rms_mps3")
    start_ts: _Time | None = Field(None, description="Trip start, UTC.")
    end_ts: _Time | None = Field(None, description="Trip end, UTC.")


class TripIn(BaseModel):
    """One trip: its identity plus either its raw pings or its precomputed features."""

    model_config = _STRICT

    trip_id: _Id | None = Field(
        None, description="Trip identifier; when absent, one is derived as in batch scoring."
    )
    vehicle_id: _Id = Field(description=PING_FIELD_DOCS["vehicle_id"])
    driver_id: _Id | None = Field(None, description=PING_FIELD_DOCS["driver_id"])
    fleet_id: _Id | None = Field(None, description=PING_FIELD_DOCS["fleet_id"])
    client_id: _Id | None = Field(None, description=PING_FIELD_DOCS["client_id"])
    pings: list[PingIn] | None = Field(
        None,
        description=(
            "Raw pings in time order; cleaned and turned into features with the model's own "
            "cleaning, trip and feature settings, exactly as batch scoring does."
        ),
    )
    features: TripFeaturesIn | None = Field(
        None, description="Precomputed trip features instead of pings."
    )

    @model_validator(mode="after")
    def _pings_or_features(self) -> TripIn:
        if (self.pings is None) == (self.features is None):
            raise ValueError("give exactly one of 'pings' or 'features'")
        return self


class BatchScoreRequest(BaseModel):
    """Many trips in one request; each is scored as if posted alone."""

    model_config = _STRICT

    trips: list[TripIn] = Field(min_length=1, description="The trips to score.")


class TripFeaturesOut(BaseModel):
    """Trip features as computed (or as posted); counts are null for posted features."""

    model_config = ConfigDict(frozen=True)

    ping_count: int | None = _feature_out("ping_count")
    duration_s: float | None = _feature_out("duration_s")
    distance_km: float | None = _feature_out("distance_km")
    avg_speed_kmh: float | None = _feature_out("avg_speed_kmh")
    max_speed_kmh: float | None = _feature_out("max_speed_kmh")
    p95_speed_kmh: float | None = _feature_out("p95_speed_kmh")
    speed_std_kmh: float | None = _feature_out("speed_std_kmh")
    hard_brake_count: int | None = _feature_out("hard_brake_count")
    harsh_accel_count: int | None = _feature_out("harsh_accel_count")
    harsh_corner_count: int | None = _feature_out("harsh_corner_count")
    hard_brake_per_100km: float | None = _feature_out("hard_brake_per_100km")
    harsh_accel_per_100km: float | None = _feature_out("harsh_accel_per_100km")
    harsh_corner_per_100km: float | None = _feature_out("harsh_corner_per_100km")
    speeding_share: float | None = _feature_out("speeding_share")
    speeding_moderate_share: float | None = _feature_out("speeding_moderate_share")
    speeding_severe_share: float | None = _feature_out("speeding_severe_share")
    night_share: float | None = _feature_out("night_share")
    idle_share: float | None = _feature_out("idle_share")
    stop_count: int | None = _feature_out("stop_count")
    jerk_rms_mps3: float | None = _feature_out("jerk_rms_mps3")
    event_source: str | None = Field(
        None, description="imu when accelerometer columns drove events, gps otherwise."
    )


class TripScore(BaseModel):
    """The trip score record (docs/design.md) for one trip."""

    model_config = ConfigDict(frozen=True)

    trip_id: str | None = Field(description="Trip identifier.")
    vehicle_id: str = Field(description="Vehicle identifier.")
    driver_id: str | None = Field(description="Driver identifier (the vehicle when not given).")
    fleet_id: str | None = Field(description="Fleet identifier.")
    client_id: str | None = Field(description="Client identifier.")
    start_ts: datetime | None = Field(description="First kept ping, UTC.")
    end_ts: datetime | None = Field(description="Last kept ping, UTC.")
    features: TripFeaturesOut = Field(description="The trip's feature values.")
    risk_probability: float = Field(
        ge=0, le=1, description="Calibrated probability (0-1) of an incident on this trip."
    )
    score: float = Field(ge=0, le=100, description="Driver Score 0-100, higher is safer.")
    risk_band: Literal["low", "moderate", "elevated", "high"] = Field(
        description="low ≥ 90, moderate ≥ 75, elevated ≥ 60, high < 60 (score points)."
    )
    reasons: list[str] = Field(description="Behaviours that lowered the score, worst first.")
    model_name: str = Field(description="Registered model name.")
    model_version: str = Field(description="Registered model version that produced the score.")
    model_role: Literal["champion", "challenger"] = Field(
        description="Role of the answering model in the rollout."
    )
    scored_at: datetime = Field(description="Scoring time, UTC.")
    decision_id: str = Field(description="Id of the rollout decision in the prediction log.")
    pings_set_aside: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "Posted pings set aside by cleaning, per reason (docs/telemetry.md); empty for "
            "posted features."
        ),
    )


class BatchScoreResponse(BaseModel):
    """Scores in the order of the posted trips."""

    scores: list[TripScore]
    pings_set_aside: dict[str, int] = Field(
        default_factory=dict, description="Posted pings set aside by cleaning, per reason."
    )


class FieldProblem(BaseModel):
    """One invalid field."""

    field: str = Field(description="Dotted path of the field, e.g. trips.0.pings.3.speed_mps.")
    message: str = Field(description="What is wrong with it.")


class ValidationErrorResponse(BaseModel):
    """422: the request is well-formed JSON but some fields are invalid."""

    error: Literal["invalid_request"] = "invalid_request"
    message: str
    problems: list[FieldProblem]


class ErrorResponse(BaseModel):
    """Any other error: a kind, a message, and the request id to find it in the logs."""

    error: str = Field(description="Error kind, e.g. unauthorized, not_ready, body_too_large.")
    message: str
    request_id: str | None = None


class ModelVersionInfo(BaseModel):
    """A loaded model version with what it learned from and how it measured."""

    role: Literal["champion", "challenger"] = Field(description="Registry alias it serves as.")
    version: str = Field(description="Registered model version.")
    loaded_at: datetime = Field(description="When this process loaded it, UTC.")
    created_at: datetime = Field(description="When it was trained, UTC.")
    decision_threshold: float = Field(description="Alerting probability threshold (0-1).")
    feature_names: list[str] = Field(description="Model inputs in order.")
    metrics: dict[str, float] = Field(description="Holdout metrics recorded at training.")
    lineage: dict[str, str] = Field(description="Data versions (content hashes) and code version.")


class ModelsResponse(BaseModel):
    """The models serving now and the rollout split."""

    model_name: str
    models: list[ModelVersionInfo]
    rollout: RolloutPolicy


class Readiness(BaseModel):
    """Readiness: a model is loaded (and why not, when not)."""

    ready: bool
    reason: str | None = None
    champion_version: str | None = None
    challenger_version: str | None = None
