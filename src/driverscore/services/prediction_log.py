"""Which prediction log a process writes to, chosen from the settings.

Above the adapters on purpose: the Parquet sink and the Kafka sink are two adapters, and
picking one is wiring, shared by every path that scores (the service, batch scoring, the
embedded stream runner).
"""

from __future__ import annotations

from pathlib import Path

from driverscore.adapters.prediction_log import ParquetPredictionLog, PredictionLog
from driverscore.settings import Settings

__all__ = ["open_prediction_log"]


def open_prediction_log(settings: Settings) -> PredictionLog:
    """Parquet parts under the home folder by default; a Kafka topic when
    ``service.prediction_log`` is ``kafka``."""
    if settings.service.prediction_log == "kafka":
        from driverscore.adapters.kafka.broker import resolve_bootstrap
        from driverscore.adapters.kafka.prediction_log import KafkaPredictionLog

        # The same broker as every command of this home (a `driverscore kafka up` one too).
        return KafkaPredictionLog(
            resolve_bootstrap(settings).bootstrap_servers, settings.kafka.topics.predictions
        )
    log_dir = settings.service.prediction_log_dir or settings.home / "prediction_log"
    return ParquetPredictionLog(Path(log_dir))
