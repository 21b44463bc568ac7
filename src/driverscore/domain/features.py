"""Trip features: THE one definition, called by batch, the stream processor and the REST service."""

from __future__ import annotations

from typing import Final

#: Model inputs and their monotone direction: +1 means risk never falls when the feature rises,
#: 0 means no constraint. The order is the model's input order.
MODEL_FEATURES: Final[dict[str, int]] = {
    "distance_km": 1,
    "avg_speed_kmh": 0,
    "p95_speed_kmh": 0,
    "speed_std_kmh": 1,
    "hard_brake_per_100km": 1,
    "harsh_accel_per_100km": 1,
    "harsh_corner_per_100km": 1,
    "speeding_share": 1,
    "night_share": 1,
    "idle_share": 0,
    "jerk_rms_mps3": 1,
}
