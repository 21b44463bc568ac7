"""Claims files with rows that cannot be used: training refuses, or keeps them aside.

A small simulated fleet (as in the S3/Dagster tests) gives real trips and claims; its
claims are written as a CSV with ISO-8601 text, the way claims systems export them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.storage import DataStore
from driverscore.pipelines.simulation_run import SimulationOutput, write_simulation
from driverscore.pipelines.training_run import run_training
from driverscore.settings import Settings, TrainingConfig
from driverscore.simulation import SimulationConfig
from driverscore.training.dataset import LABEL_COLUMN, label_trips

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL_FLEET = SimulationConfig(vehicles=40, days=18, seed=3)
REFERENCE_TIME = SMALL_FLEET.start + timedelta(days=SMALL_FLEET.days)
#: The issue's example: the same export, every other claim time in another layout.
ODD_TIME = "08/01/2026 15:41"


@dataclass(frozen=True)
class Claims:
    fleet: SimulationOutput
    typed: pl.DataFrame
    clean_csv: Path
    half_bad_csv: Path

    @property
    def bad_rows(self) -> int:
        return self.typed.height // 2


@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory) -> Claims:
    out = tmp_path_factory.mktemp("fleet")
    fleet = write_simulation(SMALL_FLEET, str(out), {})
    typed = pl.read_parquet(fleet.incidents_uri)
    assert typed.height >= 20, "the fleet needs enough claims for a share to mean something"
    as_text = typed.with_columns(
        pl.col("incident_ts", "reported_at").dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")
    )
    clean_csv = out / "claims.csv"
    as_text.write_csv(clean_csv)
    half_bad_csv = out / "claims_half_bad.csv"
    as_text.with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 1)
        .then(pl.lit(ODD_TIME))
        .otherwise(pl.col("incident_ts"))
        .alias("incident_ts")
    ).write_csv(half_bad_csv)
    return Claims(fleet=fleet, typed=typed, clean_csv=clean_csv, half_bad_csv=half_bad_csv)


def test_train_refuses_claims_whose_times_do_not_parse(claims: Claims, tmp_path: Path) -> None:
    env = {**os.environ, "DRIVERSCORE_HOME": str(tmp_path), "COLUMNS": "160"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "driverscore",
            "train",
            "--pings",
            claims.fleet.pings_uri,
            "--labels",
            str(claims.half_bad_csv),
            "--reference-time",
            REFERENCE_TIME.isoformat(),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    message = lines[0]
    share = claims.bad_rows / claims.typed.height
    for part in (
        str(claims.half_bad_csv),
        f"{claims.bad_rows:,} of {claims.typed.height:,} claim rows rejected ({share:.1%}",
        f"unparseable_incident_ts ({claims.bad_rows:,})",
        f"incident_ts='{ODD_TIME}'",
        "training.max_rejected_label_share",
        "DRIVERSCORE_TRAINING__MAX_REJECTED_LABEL_SHARE",
    ):
        assert part in message, message
    # The claims are checked first: a broken claims file costs no ping processing.
    data_root = tmp_path / "data"
    assert not (data_root / "canonical").exists()
    assert (data_root / "label_quarantine" / "LATEST").exists()


def test_with_the_limit_raised_training_keeps_the_rejected_claims_and_counts_them(
    claims: Claims, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path, training=TrainingConfig(max_rejected_label_share=0.6))
    result = run_training(
        settings,
        pings_uri=claims.fleet.pings_uri,
        incidents_uri=str(claims.half_bad_csv),
        reference_time=REFERENCE_TIME,
    )
    store = DataStore(settings.resolved_data_uri, {})
    kept = claims.typed.height - claims.bad_rows
    manifest = store.read_json(result.manifest_uri)["artifacts"]
    assert manifest["labels_in"] == claims.typed.height
    assert manifest["labels_kept"] == kept
    assert manifest["labels_duplicate"] == 0
    assert manifest["labels_rejected"] == {"unparseable_incident_ts": claims.bad_rows}

    quarantine = store.read_dataset(manifest["label_quarantine"])
    assert quarantine["reason"].to_list() == ["unparseable_incident_ts"] * claims.bad_rows
    assert quarantine["value"].to_list() == [ODD_TIME] * claims.bad_rows
    assert quarantine["row"].to_list() == list(range(2, claims.typed.height + 1, 2))
    assert set(quarantine["source"]) == {str(claims.half_bad_csv)}
    assert set(quarantine["stage"]) == {"labels"}

    quality = store.read_json(result.prepared.quality_uri)
    assert quality["labels"]["labels_rejected"] == manifest["labels_rejected"]
    assert quality["rows_in"] == result.prepared.quality["rows_in"]
    assert store.read_dataset(result.data.labels).height == kept


def test_a_clean_claims_csv_trains_exactly_as_its_typed_claims(
    claims: Claims, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path)
    result = run_training(
        settings,
        pings_uri=claims.fleet.pings_uri,
        incidents_uri=str(claims.clean_csv),
        reference_time=REFERENCE_TIME,
    )
    store = DataStore(settings.resolved_data_uri, {})
    manifest = store.read_json(result.manifest_uri)["artifacts"]
    assert (manifest["labels_in"], manifest["labels_kept"]) == (claims.typed.height,) * 2
    assert manifest["labels_rejected"] == {} and manifest["labels_duplicate"] == 0
    assert store.read_dataset(manifest["label_quarantine"]).height == 0
    # ISO-8601 text gives the very instants the simulator wrote as typed timestamps.
    assert store.read_dataset(result.data.labels).equals(claims.typed)

    features = store.read_dataset(result.prepared.features)
    expected = label_trips(features, claims.typed, REFERENCE_TIME, maturity_days=7.0)
    trained_on = pl.concat([result.data.train, result.data.holdout])
    assert trained_on.height == expected.height
    assert int(trained_on[LABEL_COLUMN].sum()) == int(expected[LABEL_COLUMN].sum()) > 0
    incident_rate = result.data.label_quality["incident_rate"]
    assert incident_rate == pytest.approx(expected.select(pl.col(LABEL_COLUMN).mean()).item())
