"""The trip feature contract: every feature's name, unit, valid range and meaning, once.

The REST schemas (``services/api/schemas.py``), the validation of feature rows on every
scoring path (:func:`feature_problems`, called by ``domain/trip_scoring.py``) and the
feature table of ``docs/features.md`` (:func:`feature_table_markdown`, a test keeps the
page equal to it) all come from :data:`FEATURE_CONTRACT`. The computation itself is
``domain/features.py``; its tests check that computed rows satisfy this contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "FEATURE_CONTRACT",
    "MODEL_INPUT_MAX",
    "FeatureSpec",
    "feature_problem",
    "feature_table_markdown",
]

#: Largest value a model input may take: the ONNX model reads float32.
MODEL_INPUT_MAX: Final = 3.4e38


@dataclass(frozen=True)
class FeatureSpec:
    """One numeric column of the trip feature row."""

    name: str
    unit: str
    description: str
    minimum: float = 0.0
    maximum: float = MODEL_INPUT_MAX
    #: Null is a valid value (the feature is undefined for some trips), not a missing one.
    nullable: bool = False
    integer: bool = False


def _share(name: str, description: str, nullable: bool = False) -> FeatureSpec:
    return FeatureSpec(name, "0-1", description, 0.0, 1.0, nullable=nullable)


#: Every numeric column of the trip feature row, in row order.
FEATURE_CONTRACT: Final[dict[str, FeatureSpec]] = {
    spec.name: spec
    for spec in (
        FeatureSpec("ping_count", "pings", "Kept fixes in the trip.", integer=True),
        FeatureSpec("duration_s", "s", "Last fix minus first fix."),
        FeatureSpec(
            "distance_km",
            "km",
            "Distance driven: ∫ speed dt over steps of at most max_dt_s, else the "
            "great-circle length of the step.",
        ),
        FeatureSpec(
            "avg_speed_kmh",
            "km/h",
            "Distance divided by duration (stops included); null for a trip of no duration.",
            nullable=True,
        ),
        FeatureSpec("max_speed_kmh", "km/h", "Highest speed.", nullable=True),
        FeatureSpec("p95_speed_kmh", "km/h", "95th percentile of speed.", nullable=True),
        FeatureSpec(
            "speed_std_kmh",
            "km/h",
            "Standard deviation of speed while moving (speed ≥ idle); null when never moving.",
            nullable=True,
        ),
        FeatureSpec(
            "hard_brake_count",
            "events",
            "Hard-braking events: one per run of fixes decelerating beyond the threshold.",
            integer=True,
        ),
        FeatureSpec(
            "harsh_accel_count",
            "events",
            "Harsh-acceleration events: one per run of fixes beyond the threshold.",
            integer=True,
        ),
        FeatureSpec(
            "harsh_corner_count",
            "events",
            "Harsh-cornering events: from the IMU, one per run of fixes beyond the threshold; "
            "from GPS, one per run whose speed × yaw rate (over a corner_window_s window) is "
            "beyond it and that turns the vehicle by at least min_corner_turn_deg.",
            integer=True,
        ),
        FeatureSpec(
            "hard_brake_per_100km",
            "events/100 km",
            "Hard-braking events per 100 km (0 when the distance is 0).",
        ),
        FeatureSpec(
            "harsh_accel_per_100km",
            "events/100 km",
            "Harsh-acceleration events per 100 km (0 when the distance is 0).",
        ),
        FeatureSpec(
            "harsh_corner_per_100km",
            "events/100 km",
            "Harsh-cornering events per 100 km (0 when the distance is 0).",
        ),
        _share(
            "speeding_share",
            "Share of moving time with a known limit spent above limit + tolerance (2 m/s); "
            "the limit is the highest known within speed_limit_window_m (500 m) of road "
            "around the fix; "
            "null when no limit is known.",
            nullable=True,
        ),
        _share(
            "speeding_moderate_share",
            "Share of moving time with a known limit spent more than speeding_moderate_kmh "
            "(10 km/h) over it; null as speeding_share.",
            nullable=True,
        ),
        _share(
            "speeding_severe_share",
            "Share of moving time with a known limit spent more than speeding_severe_kmh "
            "(20 km/h) over it; null as speeding_share.",
            nullable=True,
        ),
        _share(
            "night_share",
            "Share of trip time in the night window, local time; null when no step between "
            "fixes is short enough to time (all longer than max_dt_s).",
            nullable=True,
        ),
        _share(
            "idle_share",
            "Share of trip time below the idle speed; null as night_share.",
            nullable=True,
        ),
        FeatureSpec(
            "stop_count", "stops", "Moving → stopped transitions inside the trip.", integer=True
        ),
        FeatureSpec(
            "jerk_rms_mps3",
            "m/s³",
            "RMS of the change of longitudinal acceleration per second while moving; null "
            "when the trip has no two consecutive accelerations while moving.",
            nullable=True,
        ),
    )
}


def feature_problem(spec: FeatureSpec, value: float | None) -> str | None:
    """Why ``value`` is not a valid ``spec`` value, or ``None`` when it is."""
    if value is None or value != value:  # null or NaN
        return None if spec.nullable else "missing (a number is required)"
    if value in (float("inf"), float("-inf")):
        return f"{value} is not a finite number"
    if value < spec.minimum:
        return f"{value:g} is below {spec.minimum:g}"
    if value > spec.maximum:
        return f"{value:g} is above {spec.maximum:g}"
    return None


def feature_table_markdown() -> str:
    """The feature table of ``docs/features.md``, generated from the contract."""
    lines = ["| column | unit | valid range | meaning |", "|---|---|---|---|"]
    for spec in FEATURE_CONTRACT.values():
        top = "∞" if spec.maximum >= MODEL_INPUT_MAX else f"{spec.maximum:g}"
        valid = f"{spec.minimum:g} – {top}" + (", or null" if spec.nullable else "")
        lines.append(f"| `{spec.name}` | {spec.unit} | {valid} | {spec.description} |")
    return "\n".join(lines) + "\n"
