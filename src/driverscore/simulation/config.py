"""Knobs of the fleet simulator: fleet size, data dirt and drift, with their units."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DirtConfig(BaseModel):
    """Fractions of pings that get each kind of defect, for the cleaning stage to catch.

    All zero gives clean data.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    duplicate_rate: float = Field(default=0.002, ge=0, le=1, description="Pings sent twice.")
    out_of_order_rate: float = Field(
        default=0.001, ge=0, le=1, description="Pings swapped with their successor."
    )
    zero_coordinate_rate: float = Field(
        default=0.0005, ge=0, le=1, description="Pings reporting (0, 0) coordinates."
    )
    gps_spike_rate: float = Field(
        default=0.0005, ge=0, le=1, description="Single fixes that jump kilometres away."
    )
    impossible_speed_rate: float = Field(
        default=0.0003, ge=0, le=1, description="Pings reporting an impossible speed (150 m/s)."
    )
    bad_timestamp_rate: float = Field(
        default=0.0002, ge=0, le=1, description="Pings stamped at epoch 0 (device clock reset)."
    )

    @classmethod
    def clean(cls) -> DirtConfig:
        """No defects at all: every simulated ping is a good one."""
        return cls(
            duplicate_rate=0,
            out_of_order_rate=0,
            zero_coordinate_rate=0,
            gps_spike_rate=0,
            impossible_speed_rate=0,
            bad_timestamp_rate=0,
        )


class DriftConfig(BaseModel):
    """Changes of the world or of the devices, for drift detection to notice.

    Each drift has a start day N (0-based, counted from ``SimulationConfig.start``): it
    applies to the trips scheduled to start at or after ``start + N days``, so the days
    before it are undrifted. A trip never changes device or speeds midway: the schedule's
    planned start decides (a trip delayed past midnight by the vehicle's previous trip keeps
    the state of its planned start). Start day 0 drifts from the first day.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    new_fleet_vehicles: int = Field(
        default=0,
        ge=0,
        description="Vehicles of an extra fleet 'fleet-new' with a riskier driver mix.",
    )
    new_fleet_start_day: int = Field(
        default=0, ge=0, description="Day the new fleet's vehicles start driving (0-based)."
    )
    new_fleet_aggressiveness_shift: float = Field(
        default=0.25,
        ge=-1,
        le=1,
        description="Added to the aggressiveness of the new fleet's drivers.",
    )
    speed_sensor_bias: float = Field(
        default=1.0,
        gt=0,
        description="Multiplier on the reported speed_mps of the affected vehicles.",
    )
    speed_sensor_bias_share: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of vehicles whose speed sensor carries the bias.",
    )
    speed_sensor_bias_start_day: int = Field(
        default=0, ge=0, description="Day the speed sensor bias starts (0-based)."
    )
    speed_unit_kmh_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of vehicles whose devices report km/h numbers in speed_mps.",
    )
    speed_unit_kmh_start_day: int = Field(
        default=0, ge=0, description="Day the km/h devices start sending km/h (0-based)."
    )
    seasonal_speed_factor: float = Field(
        default=1.0, gt=0, description="Multiplier on the drivers' target speeds (weather, season)."
    )
    seasonal_start_day: int = Field(
        default=0, ge=0, description="Day the seasonal speed factor starts (0-based)."
    )
    gps_only_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "Share of the vehicles with an IMU whose devices turn GPS-only: accelerometer "
            "columns null and phone-grade GPS (a tracker replaced by a phone app)."
        ),
    )
    gps_only_start_day: int = Field(
        default=0, ge=0, description="Day those devices turn GPS-only (0-based)."
    )


class SimulationConfig(BaseModel):
    """What fleet to simulate, for how long, from which seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vehicles: int = Field(default=50, ge=0, description="Vehicles of the regular fleets.")
    days: int = Field(default=7, ge=1, description="Simulated days.")
    seed: int = Field(default=0, ge=0, description="Same seed, same frames.")
    start: datetime = Field(
        default=datetime(2026, 1, 5, tzinfo=UTC),
        description="Local midnight of the first day (aware; read as UTC wall clock).",
    )
    fleets: int = Field(default=3, ge=1, description="Regular fleets, each based in its own city.")
    clients_per_fleet: int = Field(default=4, ge=1, description="Clients (customers) per fleet.")
    trips_per_day: float = Field(default=3.0, gt=0, description="Mean trips per vehicle and day.")
    imu_share: float = Field(
        default=0.3, ge=0, le=1, description="Share of vehicles whose devices carry accelerometers."
    )
    speed_limit_share: float = Field(
        default=0.85,
        ge=0,
        le=1,
        description="Share of vehicles whose pings carry map-matched limits.",
    )
    habitual_speeder_share: float = Field(
        default=0.09,
        ge=0,
        le=1,
        description=(
            "Share of drivers who are habitual speeders: 10-25 km/h over the limit on most "
            "segments, with a high latent speeding trait."
        ),
    )
    wrong_limit_per_100km: float = Field(
        default=2.0,
        ge=0,
        description=(
            "Stretches of a few hundred metres where the map's limit is wrong (mostly too "
            "low), per 100 km of map-matched driving."
        ),
    )
    missing_limit_per_100km: float = Field(
        default=3.0,
        ge=0,
        description="Stretches where the map has no limit, per 100 km of map-matched driving.",
    )
    include_trip_id: bool = Field(default=False, description="Fill trip_id in the pings.")
    vehicles_per_chunk: int = Field(
        default=200, ge=1, description="Vehicles simulated together; bounds memory."
    )
    dirt: DirtConfig = Field(default_factory=DirtConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)

    @field_validator("start")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        # A naive start would silently mean the machine's zone; the data contract is UTC.
        if value.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        return value.astimezone(UTC)

    @property
    def total_vehicles(self) -> int:
        """Regular vehicles plus those of the drift fleet."""
        return self.vehicles + self.drift.new_fleet_vehicles


#: Pings one chunk may hold: about 0.5 kB each at peak, so ~1 GB of memory per chunk.
CHUNK_PING_BUDGET = 2_000_000
#: A vehicle drives roughly this many pings a day (3 trips of ~15 minutes at 1 Hz).
PINGS_PER_VEHICLE_DAY = 3_000


def vehicles_per_chunk_for(days: int, trips_per_day: float = 3.0) -> int:
    """Chunk size keeping one chunk near ``CHUNK_PING_BUDGET`` pings, whatever the span."""
    per_vehicle = max(1.0, days * PINGS_PER_VEHICLE_DAY * trips_per_day / 3.0)
    return max(1, min(200, int(CHUNK_PING_BUDGET // per_vehicle)))
