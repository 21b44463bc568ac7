"""The label model: incidents come from the latent driving risk, never from features.

Per trip, the incident hazard per kilometre is

    λ = BASE_HAZARD_PER_KM · exp(β_a·aggressiveness + β_s·speeding_propensity
                                 + β_m·(1 − smoothness)) · (1 + β_n·night_fraction)

where the traits are the driver's latent traits (0..1) and ``night_fraction`` is the
share of this trip's time in the local night (22:00–05:00, mean solar time). The trip has
an incident with probability ``P = 1 − exp(−λ · distance_km)``; that probability is the
trip's ``latent_risk``. ``BASE_HAZARD_PER_KM`` is calibrated once so that the default
driver mix has an incident on ~3–4 % of trips; a riskier mix (the drift fleet) has more.

The same traits drive the kinematics (late braking, hard accelerations, tight cornering,
jerk and surprise brakes for aggressive and less smooth drivers; target speeds above the
limit for speeders, and a high speeding trait for habitual speeders; trip times for
night-prone drivers), so the behaviours that cause the risk are visible in the pings, but
the labels never look at the pings.

An incident happens at a uniform time inside its trip and is reported after a lognormal
delay (median 4 days, capped at 30 days), as claims arrive late.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

BASE_HAZARD_PER_KM: Final = 0.95e-4
BETA_AGGRESSIVENESS: Final = 3.0
BETA_SPEEDING: Final = 1.8
BETA_ROUGHNESS: Final = 1.5
BETA_NIGHT: Final = 2.0
#: Reporting delay: lognormal in days.
REPORT_MEDIAN_DAYS: Final = 4.0
REPORT_SIGMA: Final = 0.75
REPORT_MAX_DAYS: Final = 30.0
REPORT_MIN_DAYS: Final = 0.05


def hazard_per_km(
    aggressiveness: np.ndarray,
    speeding_propensity: np.ndarray,
    smoothness: np.ndarray,
    night_fraction: np.ndarray,
) -> np.ndarray:
    """Incident hazard per km of driving, from the latent traits and the trip's night share."""
    return np.asarray(
        BASE_HAZARD_PER_KM
        * np.exp(
            BETA_AGGRESSIVENESS * aggressiveness
            + BETA_SPEEDING * speeding_propensity
            + BETA_ROUGHNESS * (1.0 - smoothness)
        )
        * (1.0 + BETA_NIGHT * night_fraction),
        dtype=np.float64,
    )


@dataclass(frozen=True)
class Incidents:
    """Per trip outcome, and when each incident happened and was reported."""

    latent_risk: np.ndarray
    incident: np.ndarray
    #: Offsets for the trips with an incident only.
    incident_offset_s: np.ndarray
    report_delay_s: np.ndarray
    major: np.ndarray


def draw_incidents(
    rng: np.random.Generator,
    hazard: np.ndarray,
    distance_km: np.ndarray,
    duration_s: np.ndarray,
    aggressiveness: np.ndarray,
) -> Incidents:
    """Draw which trips have an incident, when inside the trip, and the claim delay."""
    risk = 1.0 - np.exp(-hazard * distance_km)
    incident = rng.random(len(risk)) < risk
    n = int(incident.sum())
    offset = rng.random(n) * duration_s[incident]
    delay_days = np.clip(
        REPORT_MEDIAN_DAYS * rng.lognormal(0.0, REPORT_SIGMA, n),
        REPORT_MIN_DAYS,
        REPORT_MAX_DAYS,
    )
    # Faster, harsher driving makes the worse outcomes a bit likelier.
    major = rng.random(n) < 0.15 + 0.2 * aggressiveness[incident]
    return Incidents(
        latent_risk=risk,
        incident=incident,
        incident_offset_s=offset,
        report_delay_s=delay_days * 86_400.0,
        major=major,
    )
