"""Drift statistics of 1M current trips × 20 numeric features against 1M reference trips.

Three contenders on the same data, in the same run, each in its own process (so peak
memory is its own):

- **driverscore**: the reference profile is fitted beforehand (as at training) and stored
  as JSON; timed is what a monitoring run does: load it, profile the current rows on its
  edges, and compute PSI, KS, Wasserstein and Jensen-Shannon for every column;
- **scipy**: per column ``scipy.stats.ks_2samp`` on the raw rows plus a numpy PSI over ten
  reference-quantile bins (what a team writes by hand);
- **Evidently** ``DataDriftPreset`` on the two pandas frames, in its own virtual
  environment (Evidently 0.7 fails to import with pandas 3, the project's pandas): give
  its Python with ``--evidently-python`` (see docs/monitoring.md for the two commands);
  without it Evidently is left out and said so.

Correctness is checked in the same run: driverscore's PSI against a numpy PSI on the same
bins (to 1e-9), its KS against scipy's exact two-sample statistic (within 0.005), its
Wasserstein distance against ``scipy.stats.wasserstein_distance`` (within 1 %).

    .venv/bin/python bench/bench_drift.py [--rows 1000000] [--evidently-python PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

FEATURES = 20
SEED = 20261127


def make_data(rows: int, folder: Path) -> tuple[Path, Path]:
    """Reference and current frames: skewed, zero-heavy, integer and share columns; half
    of the current columns shifted (scale, location, more zeros, a km/h share)."""
    rng = np.random.default_rng(SEED)

    def frame(drifted: bool) -> pl.DataFrame:
        columns: dict[str, np.ndarray] = {}
        for j in range(FEATURES):
            shift = drifted and j % 2 == 1
            kind = j % 5
            if kind == 0:  # distance-like, lognormal
                x = rng.lognormal(2.5 + (0.1 if shift else 0.0), 0.8, rows)
            elif kind == 1:  # speed-like, normal; a share reported in km/h when drifted
                x = rng.normal(50.0, 12.0, rows)
                if shift:
                    x = np.where(rng.random(rows) < 0.1, x * 3.6, x)
            elif kind == 2:  # event rate, 60 % zeros
                zero = 0.5 if shift else 0.6
                x = np.where(rng.random(rows) < zero, 0.0, rng.exponential(4.0, rows))
            elif kind == 3:  # a count
                x = rng.poisson(1.3 if shift else 1.0, rows).astype(np.float64)
            else:  # a share 0..1
                x = rng.beta(1.0, 8.0 if not shift else 6.0, rows)
            columns[f"f{j:02d}"] = x
        return pl.DataFrame(columns)

    reference, current = folder / "reference.parquet", folder / "current.parquet"
    frame(False).write_parquet(reference)
    frame(True).write_parquet(current)
    return reference, current


# -- contenders, each run in a child process: `bench_drift.py --contender NAME ...` ------


def run_driverscore(profile_path: Path, current_path: Path) -> dict[str, Any]:
    from driverscore.domain.drift import MonitoringConfig, compare_numeric
    from driverscore.domain.profiles import TripProfile, profile_trips

    current = pl.read_parquet(current_path)
    started = time.perf_counter()
    reference = TripProfile.from_json(profile_path.read_bytes())
    window = profile_trips(current, reference.edges)
    config = MonitoringConfig()
    results = {
        name: compare_numeric(
            name,
            reference.overall.numeric[name],
            window.overall.numeric[name],
            edges,
            config,
        ).statistics
        for name, edges in reference.edges.numeric.items()
    }
    return {"seconds": time.perf_counter() - started, "statistics": results}


def _numpy_psi(reference: np.ndarray, current: np.ndarray, cuts: np.ndarray) -> float:
    p = np.histogram(reference, bins=cuts)[0] / reference.size
    q = np.histogram(current, bins=cuts)[0] / current.size
    p, q = np.maximum(p, 1e-4), np.maximum(q, 1e-4)
    return float(np.sum((q - p) * np.log(q / p)))


def run_scipy(reference_path: Path, current_path: Path) -> dict[str, Any]:
    from scipy import stats

    reference = pl.read_parquet(reference_path)
    current = pl.read_parquet(current_path)
    started = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    for name in reference.columns:
        r, c = reference[name].to_numpy(), current[name].to_numpy()
        cuts = np.unique(np.quantile(r, np.linspace(0, 1, 11)))
        cuts[0], cuts[-1] = -np.inf, np.inf
        results[name] = {
            "ks": float(stats.ks_2samp(r, c).statistic),
            "psi": _numpy_psi(r, c, cuts),
        }
    return {"seconds": time.perf_counter() - started, "statistics": results}


_EVIDENTLY = """
import json, sys, time
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset
reference = pd.read_parquet(sys.argv[1])
current = pd.read_parquet(sys.argv[2])
started = time.perf_counter()
snapshot = Report([DataDriftPreset()]).run(current, reference)
snapshot.dict()
seconds = time.perf_counter() - started
import resource
print(json.dumps({"seconds": seconds,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def contender(name: str, args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--contender", name, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def evidently(python: str, reference: Path, current: Path) -> dict[str, Any] | str:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(_EVIDENTLY)
    done = subprocess.run(
        [python, script.name, str(reference), str(current)],
        capture_output=True,
        text=True,
        check=False,
    )
    Path(script.name).unlink()
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def correctness(
    reference_path: Path, current_path: Path, profile_path: Path, ours: dict[str, Any]
) -> list[tuple[str, float, float, bool]]:
    """(check, worst error, tolerance, passed) over every column."""
    from scipy import stats

    from driverscore.domain.profiles import TripProfile

    reference = pl.read_parquet(reference_path)
    current = pl.read_parquet(current_path)
    profile = TripProfile.from_json(profile_path.read_bytes())
    psi_error = ks_error = w_error = 0.0
    for name in reference.columns:
        r, c = reference[name].to_numpy(), current[name].to_numpy()
        edges = profile.edges.numeric[name]
        bounds = [edges.edges[k - 1] for k in edges.coarse] + [edges.edges[-1]]
        cuts = np.concatenate([[-np.inf], bounds, [np.inf]])
        # np.histogram's last bin is closed; ours are [a, b): nudge the outer edge open.
        psi_error = max(psi_error, abs(ours[name]["psi"] - _half_open_psi(r, c, cuts)))
        ks_error = max(ks_error, abs(ours[name]["ks"] - stats.ks_2samp(r, c).statistic))
        exact_w = stats.wasserstein_distance(r, c)
        w_error = max(w_error, abs(ours[name]["wasserstein"] - exact_w) / exact_w)
    return [
        ("PSI vs numpy on the same bins (abs)", psi_error, 1e-9, psi_error <= 1e-9),
        ("KS vs scipy's exact statistic (abs)", ks_error, 0.005, ks_error <= 0.005),
        ("Wasserstein vs scipy (relative)", w_error, 0.01, w_error <= 0.01),
    ]


def _half_open_psi(reference: np.ndarray, current: np.ndarray, cuts: np.ndarray) -> float:
    def shares(x: np.ndarray) -> np.ndarray:
        index = np.searchsorted(cuts[1:-1], x, side="right")
        return np.maximum(np.bincount(index, minlength=cuts.size - 1) / x.size, 1e-4)

    p, q = shares(reference), shares(current)
    return float(np.sum((q - p) * np.log(q / p)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--evidently-python", default=None)
    parser.add_argument("--contender", default=None, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        first, second = (Path(p) for p in args.paths)
        run = run_driverscore if args.contender == "driverscore" else run_scipy
        result = run(first, second)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    from driverscore.domain.profiles import ProfileEdges, profile_trips

    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        folder = Path(tmp)
        print(
            f"data: {args.rows:,} reference and {args.rows:,} current trips × {FEATURES} features"
        )
        reference_path, current_path = make_data(args.rows, folder)
        reference = pl.read_parquet(reference_path)
        started = time.perf_counter()
        edges = ProfileEdges.fit(reference, reference.columns, categorical=(), slices=())
        profile = profile_trips(reference, edges)
        fitted = time.perf_counter() - started
        profile_path = folder / "reference_profile.json"
        profile_path.write_bytes(profile.to_json_bytes())
        del reference
        print(
            f"reference profile fitted once (at training): {fitted:.1f} s, "
            f"{profile_path.stat().st_size / 1e6:.1f} MB of JSON"
        )
        ours = contender("driverscore", [str(profile_path), str(current_path)])
        plain = contender("scipy", [str(reference_path), str(current_path)])
        rows: list[tuple[str, str, str, str]] = [
            ("driverscore (profile)", f"{ours['seconds']:.2f}", f"{ours['peak_mb']:.0f}", "1×"),
            (
                "scipy ks_2samp + numpy PSI",
                f"{plain['seconds']:.2f}",
                f"{plain['peak_mb']:.0f}",
                f"{plain['seconds'] / ours['seconds']:.0f}×",
            ),
        ]
        if args.evidently_python:
            theirs = evidently(args.evidently_python, reference_path, current_path)
            if isinstance(theirs, str):
                rows.append(("Evidently DataDriftPreset", theirs, "", ""))
            else:
                rows.append(
                    (
                        "Evidently DataDriftPreset",
                        f"{theirs['seconds']:.2f}",
                        f"{theirs['peak_mb']:.0f}",
                        f"{theirs['seconds'] / ours['seconds']:.0f}×",
                    )
                )
        else:
            rows.append(("Evidently DataDriftPreset", "not run (no --evidently-python)", "", ""))
        print()
        print(f"{'contender':30s} {'seconds':>10s} {'peak MB':>9s} {'vs driverscore':>15s}")
        for name, seconds, peak, ratio in rows:
            print(f"{name:30s} {seconds:>10s} {peak:>9s} {ratio:>15s}")
        print()
        print("correctness (worst column):")
        checks = correctness(reference_path, current_path, profile_path, ours["statistics"])
        for check, error, tolerance, passed in checks:
            verdict = "ok" if passed else "FAILED"
            print(f"  {check:40s} {error:.2e} (tolerance {tolerance:g}) {verdict}")
        if not all(passed for *_, passed in checks):
            sys.exit(1)


if __name__ == "__main__":
    main()
