"""Today's feature rules and score mapping against those of model cards of schema 1.

For each seed a fleet is simulated (phones and trackers, habitual speeders, wrong and
missing map limits), prepared twice - today's rules (windowed GPS cornering, the 500 m
limit window, the 10 and 20 km/h speeding margins) and the schema-1 rules (1-s heading
cornering, each fix's own limit, no margin shares) - and a model is trained on each. Both
are scored on the same newest quarter of trips. Printed per seed and on average: ROC-AUC
of each, their paired difference, and how many trips share the best and the worst score.

    .venv/bin/python bench/eval_feature_rules.py [--vehicles 400] [--days 14] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.features import MODEL_FEATURES
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.scoring import TripScorer
from driverscore.settings import TrainingConfig
from driverscore.simulation.config import SimulationConfig
from driverscore.simulation.simulator import simulate
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.model import train_model

LEGACY_RULES = FeatureConfig(cornering="heading_step", speed_limit_window_m=0.0)
LEGACY_FEATURES = {
    name: direction
    for name, direction in MODEL_FEATURES.items()
    if name not in ("speeding_moderate_share", "speeding_severe_share")
}


def evaluate(seed: int, vehicles: int, days: int) -> dict[str, float]:
    config = SimulationConfig(vehicles=vehicles, days=days, seed=seed)
    now = config.start + timedelta(days=days + 31)  # every claim reported by then
    sim = simulate(config)
    result: dict[str, float] = {}
    y: np.ndarray | None = None
    probabilities: dict[str, np.ndarray] = {}
    for name, rules, options in (
        ("today", FeatureConfig(), {}),
        ("schema 1", LEGACY_RULES, {"features": LEGACY_FEATURES, "score_form": "clipped_linear"}),
    ):
        features = prepare_trips(sim.pings, CleaningConfig(), TripConfig(), rules, now).features
        train, holdout = time_split(label_trips(features, sim.incidents, now, 7.0), 0.25)
        model = train_model(train, TrainingConfig(), **options)  # type: ignore[arg-type]
        card = model.model_card(
            cleaning_config=CleaningConfig(), trip_config=TripConfig(), feature_config=rules
        )
        scorer = TripScorer(model.predict_proba, card, "eval", "1", "champion")
        scored = scorer.score_trips(holdout, now)
        y = holdout["incident"].to_numpy()
        probabilities[name] = scored["risk_probability"].to_numpy()
        everything = scorer.score_trips(pl.concat([train, holdout], how="diagonal_relaxed"), now)
        scores = everything["score"].to_numpy()
        result[f"{name} auc"] = float(roc_auc_score(y, probabilities[name]))
        result[f"{name} best ties"] = float(np.mean(scores == scores.max()))
        result[f"{name} worst ties"] = float(np.mean(scores == scores.min()))
        result["trips"] = float(scores.size)
        result["holdout incidents"] = float(y.sum())
    result["gain"] = result["today auc"] - result["schema 1 auc"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=400)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    print(
        "| seed | trips | holdout incidents | ROC-AUC today | ROC-AUC schema 1 | gain "
        "| best-score ties today / schema 1 | worst-score ties today / schema 1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    gains = []
    for seed in args.seeds:
        r = evaluate(seed, args.vehicles, args.days)
        gains.append(r["gain"])
        print(
            f"| {seed} | {r['trips']:.0f} | {r['holdout incidents']:.0f} "
            f"| {r['today auc']:.4f} | {r['schema 1 auc']:.4f} | {r['gain']:+.4f} "
            f"| {r['today best ties']:.3%} / {r['schema 1 best ties']:.3%} "
            f"| {r['today worst ties']:.3%} / {r['schema 1 worst ties']:.3%} |",
            flush=True,
        )
    print(f"mean gain {np.mean(gains):+.4f} over {len(gains)} seeds (sd {np.std(gains):.4f})")


if __name__ == "__main__":
    main()
