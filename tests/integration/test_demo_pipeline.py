"""The demo end to end on embedded defaults: simulate → train → register → score.

One demo run (the CLI's default fleet) is shared by the module; each test checks one
promise of the batch pipeline on it, against a real SQLite-backed MLflow registry.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from rich.console import Console

from driverscore.adapters.registry import open_registry
from driverscore.adapters.storage import DataStore
from driverscore.cli import DEMO_HISTORY_DAYS, DEMO_SEED, DEMO_VEHICLES
from driverscore.pipelines.demo import DemoResult, run_demo
from driverscore.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = [sys.executable, "-m", "driverscore"]


@dataclass(frozen=True)
class DemoRun:
    settings: Settings
    result: DemoResult
    output: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home)
    buffer = io.StringIO()
    console = Console(file=buffer, width=140)
    result = run_demo(
        settings, console, vehicles=DEMO_VEHICLES, days=DEMO_HISTORY_DAYS, seed=DEMO_SEED
    )
    return DemoRun(settings=settings, result=result, output=buffer.getvalue())


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DRIVERSCORE_HOME": str(home), "COLUMNS": "160"}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, check=False, timeout=600
    )


def test_demo_model_passes_its_gate_with_auc_above_075(demo: DemoRun) -> None:
    gate = demo.result.training.candidate.gate
    assert gate.passed, gate.failures
    assert gate.candidate.roc_auc is not None
    assert gate.candidate.roc_auc >= 0.75
    assert demo.result.training.registered.alias == "champion"


def test_demo_prints_its_summary(demo: DemoRun) -> None:
    for heading in (
        "holdout metrics",
        "gate passed",
        "trip scores per fleet",
        "riskiest 5 trips",
        "where everything went",
    ):
        assert heading in demo.output
    # It ends with the command that opens the dashboard on the demo's data.
    last = demo.output.strip().splitlines()[-1]
    assert last.startswith("dashboard: DRIVERSCORE_HOME=")
    assert ".venv/bin/driverscore dashboard" in last and "/dashboard/" in last


def test_every_input_row_is_kept_or_quarantined(demo: DemoRun) -> None:
    sim = demo.result.simulation
    rows_in_files = pl.scan_parquet(f"{sim.pings_uri}/*.parquet").select(pl.len()).collect().item()
    store = DataStore(demo.settings.resolved_data_uri, {})
    prepared = demo.result.training.prepared
    kept = store.read_dataset(prepared.cleaned).height
    quarantine = store.read_dataset(prepared.quarantine)
    assert quarantine.height > 0, "the simulator injects dirty rows; some must be caught"
    assert rows_in_files == kept + quarantine.height
    assert prepared.quality["rows_in"] == rows_in_files
    assert prepared.quality["balanced"] is True
    assert quarantine["reason"].null_count() == 0
    per_rule = prepared.quality["quarantined_per_rule"]
    assert sum(per_rule.values()) == quarantine.height
    per_source = prepared.quality["quarantined_per_source"]
    assert sum(sum(rules.values()) for rules in per_source.values()) == quarantine.height


def test_registered_version_carries_lineage(demo: DemoRun) -> None:
    registry = open_registry(demo.settings)
    version = demo.result.training.registered.version
    tags = registry.version_tags(version)
    quality = demo.result.training.prepared.quality
    assert tags["gate_status"] == "passed"
    assert tags["data_version.raw"] == quality["datasets"]["raw"]
    assert tags["data_version.features"] == quality["datasets"]["features"]
    assert tags["data_version.labels"] == demo.result.training.data.labels.version
    assert tags["code_version"].startswith("0.")
    card = registry.load_card(version)
    assert card.lineage["features"] == quality["datasets"]["features"]
    assert card.feature_config == demo.settings.features


def test_fresh_day_scores_every_trip_with_the_champion(demo: DemoRun) -> None:
    scores = pl.read_parquet(demo.result.scoring.out_uri)
    store = DataStore(demo.settings.resolved_data_uri, {})
    features = store.read_dataset(demo.result.scoring.prepared.features)
    assert scores.height == features.height > 0
    assert scores["score"].is_between(0, 100).all()
    assert set(scores["model_role"].unique()) == {"champion"}
    assert set(scores["risk_band"].unique()) <= {"low", "moderate", "elevated", "high"}
    risky = scores.filter(pl.col("score") < 60)
    assert risky.height > 0
    assert (risky["reasons"].list.len() > 0).all(), "a high-risk trip must say why"


@pytest.mark.model
@pytest.mark.parametrize(
    ("behaviour", "highest"),
    [("hard_brake_per_100km", 40.0), ("speeding_share", 1.0), ("night_share", 1.0)],
)
def test_more_risky_behaviour_never_raises_the_demo_champions_score(
    demo: DemoRun, behaviour: str, highest: float
) -> None:
    scorer = open_registry(demo.settings).load_scorer("champion")
    store = DataStore(demo.settings.resolved_data_uri, {})
    trips = store.read_dataset(demo.result.scoring.prepared.features).head(200)
    grid = np.linspace(0.0, highest, 21)
    scores = np.stack(
        [
            scorer.score_trips(
                trips.with_columns(pl.lit(value, dtype=pl.Float64).alias(behaviour)),
                scored_at=demo.result.scoring.scores["scored_at"][0],
            )["score"].to_numpy()
            for value in grid
        ]
    )
    # Rows: behaviour level; columns: trips. A score may stay flat, never rise.
    assert (np.diff(scores, axis=0) <= 1e-9).all()
    assert (scores[0] - scores[-1]).max() > 1.0, f"{behaviour} should matter for some trip"


def test_live_replay_scores_the_fresh_day_exactly_as_batch(demo: DemoRun) -> None:
    live = demo.result.live
    batch = demo.result.scoring.scores
    assert live.result.trips == batch.height > 0
    assert live.trips_matching_batch == batch.height
    assert "replay the fresh day live" in demo.output
    scores = pl.scan_parquet(live.scores_folder / "scores" / "*.parquet").collect()
    assert sorted(scores["trip_id"].to_list()) == sorted(batch["trip_id"].to_list())


def _gps_only_csv(demo: DemoRun, path: Path) -> int:
    """The fresh day as a GPS-only export: km/h, local-offset ISO times, other column names."""
    pings = pl.scan_parquet(f"{demo.result.simulation.fresh_pings_uri}/*.parquet").collect()
    vehicles = pings["vehicle_id"].unique().sort().head(12)
    export = (
        pings.filter(pl.col("vehicle_id").is_in(vehicles.implode()))
        .sort("vehicle_id", "ts")
        .select(
            pl.col("ts")
            .dt.convert_time_zone("Europe/Paris")
            .dt.strftime("%Y-%m-%dT%H:%M:%S%:z")
            .alias("time"),
            pl.col("vehicle_id").alias("unit"),
            pl.col("lat").alias("latitude"),
            pl.col("lon").alias("longitude"),
            (pl.col("speed_mps") * 3.6).round(2).alias("speed_kmh"),
        )
    )
    export.write_csv(path)
    return export.height


def test_score_gps_only_kmh_csv_through_a_mapping(demo: DemoRun, tmp_path: Path) -> None:
    csv = tmp_path / "gps_only.csv"
    rows = _gps_only_csv(demo, csv)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(
        "columns:\n  ts: time\n  vehicle_id: unit\n  lat: latitude\n  lon: longitude\n"
        "  speed_mps: speed_kmh\nunits:\n  ts: iso\n  speed_mps: km/h\n",
        encoding="utf-8",
    )
    out = tmp_path / "scores.csv"
    # --no-store: the demo's score store holds the demo's trips (a test below counts them).
    done = _cli(
        demo.settings.home,
        "score",
        str(csv),
        "--mapping",
        str(mapping),
        "--out",
        str(out),
        "--no-store",
    )
    assert done.returncode == 0, done.stderr
    scores = pl.read_csv(out)
    assert scores.height > 5
    assert scores["score"].null_count() == 0
    assert scores["score"].is_between(0, 100).all()
    assert "reasons" in scores.columns
    assert set(scores["event_source"].unique()) == {"gps"}
    assert rows > scores.height


def test_score_the_shipped_example_file(demo: DemoRun, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "example.parquet"
    done = _cli(
        demo.settings.home,
        "score",
        str(root / "examples" / "gps_only_kmh.csv"),
        "--mapping",
        str(root / "examples" / "gps_only_kmh.mapping.yaml"),
        "--out",
        str(out),
        "--no-store",
    )
    assert done.returncode == 0, done.stderr
    scores = pl.read_parquet(out)
    assert scores.height >= 1
    assert scores["score"].null_count() == 0
    assert scores["hard_brake_count"].sum() >= 1, "the example contains a 50→0 km/h stop in 4 s"


def test_bad_mapping_gives_one_clear_line(demo: DemoRun, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    mapping = tmp_path / "wrong.yaml"
    mapping.write_text("columns:\n  ts: timestamp_utc\n", encoding="utf-8")
    done = _cli(
        demo.settings.home,
        "score",
        str(root / "examples" / "gps_only_kmh.csv"),
        "--mapping",
        str(mapping),
        "--out",
        str(tmp_path / "x.csv"),
    )
    assert done.returncode == 1  # input data that does not fit its mapping: an error, not usage
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "gps_only_kmh.csv" in lines[0]
    assert "timestamp_utc" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_aggregate_weights_trip_scores_by_distance(demo: DemoRun, tmp_path: Path) -> None:
    out = tmp_path / "fleets.parquet"
    done = _cli(
        demo.settings.home,
        "aggregate",
        demo.result.scoring.out_uri,
        "--by",
        "fleet",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    fleets = pl.read_parquet(out)
    scores = demo.result.scoring.scores
    assert set(fleets["fleet_id"]) == set(scores["fleet_id"])
    expected = (
        scores.group_by("fleet_id")
        .agg((pl.col("score") * pl.col("distance_km")).sum() / pl.col("distance_km").sum())
        .sort("fleet_id")
    )
    assert np.allclose(fleets.sort("fleet_id")["score"], expected["score"])


def test_demo_leaves_a_score_store_the_cli_reads(demo: DemoRun) -> None:
    """Batch and the live replay scored the fresh day; the store counts each trip once,
    with its route, and `driverscore scores` answers from it."""
    from driverscore.adapters.score_store.duckdb_store import open_score_store

    store = open_score_store(demo.settings)
    counts = store.counts()
    scored = demo.result.scoring.scores
    live = pl.read_parquet(demo.result.live.scores_folder / "scores")
    trips = pl.concat([scored, live], how="diagonal_relaxed").select("vehicle_id", "trip_id")
    assert counts["trip_latest"] == trips.n_unique()
    assert counts["trip_routes"] == counts["trip_latest"]
    trip = scored.row(0, named=True)
    route = store.route(trip["vehicle_id"], trip["trip_id"])
    # Spacing points and the fixes of counted events (docs/store.md: at most 500 each).
    assert 2 <= route.height <= 1_000
    assert route["hard_brake"].sum() == trip["hard_brake_count"]
    assert route["harsh_corner"].sum() == trip["harsh_corner_count"]
    shares = _cli(demo.settings.home, "scores", "band_shares", "--format", "csv")
    assert shares.returncode == 0, shares.stderr
    table = pl.read_csv(io.StringIO(shares.stdout))
    assert table["trip_count"].sum() == counts["trip_latest"]
    history = _cli(
        demo.settings.home,
        "scores",
        "trip_history",
        "--driver",
        trip["driver_id"],
        "--format",
        "csv",
    )
    assert history.returncode == 0, history.stderr
    assert trip["trip_id"] in pl.read_csv(io.StringIO(history.stdout))["trip_id"].to_list()
    table = _cli(demo.settings.home, "scores", "worst_drivers", "--limit", "3")
    assert table.returncode == 0, table.stderr
    assert "worst_drivers (duckdb)" in table.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("scores", "nonsense"), "no query 'nonsense': use one of group_scores"),
        (("scores", "trip_history"), "trip_history needs --driver ID or --vehicle ID"),
        (("scores", "group_scores", "--by", "planet"), "--by 'planet': use one of driver"),
        (("scores", "band_shares", "--end", "yesterday"), "--end: 'yesterday' is not an ISO"),
    ],
)
def test_a_wrong_store_query_is_one_line(
    demo: DemoRun, args: tuple[str, ...], expected: str
) -> None:
    done = _cli(demo.settings.home, *args)
    assert done.returncode == 2
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_scores_without_a_store_is_one_line(tmp_path: Path) -> None:
    done = _cli(tmp_path, "scores", "band_shares")
    assert done.returncode == 1
    assert "no score store at" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
