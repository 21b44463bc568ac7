"""The Kafka-free stream processor: dead letters, late pings, trip outputs, rollout and
batching."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from driverscore.adapters.kafka.messages import (
    CLOCK_KEY,
    REJECT_REASONS,
    decode_message,
    encode_batch,
    encode_clock,
    encode_ping,
)
from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.schema import conform_pings
from driverscore.domain.scoring import TripScorer, feature_matrix
from driverscore.domain.sessions import MemoryScope, SessionRules, TripAssembler
from driverscore.domain.trip_scoring import ScoringModels, alert_text
from driverscore.services.stream import (
    CLOSE_TRIGGER_HEADER,
    CLOSED_AT_HEADER,
    OutMessage,
    PingProcessor,
    StreamMetrics,
    TripScoringStep,
)
from driverscore.settings import KafkaTopics, TrainingConfig
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.model import train_model
from driverscore.training.onnx_export import export_onnx
from driverscore.training.synthetic import synthetic_trips

NOW = datetime(2026, 3, 1, tzinfo=UTC)
START = datetime(2026, 2, 27, 8, 0, tzinfo=UTC)
GAP_S = 300.0
GRACE_S = 30.0
TOPICS = KafkaTopics(
    pings="pings",
    dlq="pings-dlq",
    trip_features="features",
    scores="scores",
    alerts="alerts",
    shadow_scores="shadow",
    routes="routes",
    predictions="predictions",
)
REASON = "driverscore.dlq.reason"
SOURCE = "driverscore.dlq.source"
HEADERS = [("traceparent", b"00-abc-def-01"), ("origin", b"device")]


@pytest.fixture(scope="module")
def scorer() -> TripScorer:
    """A real ONNX-backed scorer trained on synthetic trips, as register_synthetic_model
    builds it, without the MLflow registry round trip."""
    features, incidents = synthetic_trips(1500, seed=11)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    train, holdout = time_split(labelled, 0.25)
    trained = train_model(train, TrainingConfig(max_iter=20, min_samples_leaf=50))
    x = feature_matrix(holdout, trained.feature_names)
    card = trained.model_card(
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(gap_s=GAP_S),
        feature_config=FeatureConfig(),
        created_at=NOW,
    )
    model = OnnxRiskModel(export_onnx(trained, x))
    return TripScorer(model.predict_proba, card, "driverscore", "1", "champion")


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    processor: PingProcessor
    scope: MemoryScope
    metrics: StreamMetrics
    clock: FakeClock
    offset: int = 0
    sent: list[OutMessage] = field(default_factory=list)

    def send(
        self,
        value: bytes | None,
        key: str | None,
        timestamp_ms: int,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> list[OutMessage]:
        self.offset += 1
        out = self.processor.process(
            value,
            key,
            timestamp_ms,
            list(HEADERS if headers is None else headers),
            self.scope,
            f"pings/0/{self.offset}",
        )
        self.sent.extend(out)
        return out

    def drive(
        self, vehicle: str, rows: list[dict[str, Any]], per_message: int = 30
    ) -> list[OutMessage]:
        """A trip as batch messages; everything they published."""
        out: list[OutMessage] = []
        for i in range(0, len(rows), per_message):
            chunk = rows[i : i + per_message]
            out.extend(self.send(encode_batch(vehicle, chunk), vehicle, ms(chunk[-1]["ts"])))
        return out

    def clock_message(self, ts: datetime) -> list[OutMessage]:
        return self.send(encode_clock(ts), CLOCK_KEY, ms(ts))

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def make_rig(
    scorer: TripScorer,
    *,
    batch_trips: int = 1,
    batch_wait_s: float = 0.0,
    step: TripScoringStep | None = None,
    catch_up_wait_s: float = 0.0,
    wall_clock: FakeClock | None = None,
    commit_wait_s: float | None = None,
    closed_at_header: bool = False,
) -> Rig:
    metrics = step.metrics if step is not None else StreamMetrics()
    clock = FakeClock()
    step = step or TripScoringStep(scorer, metrics, now=lambda: NOW)
    processor = PingProcessor(
        step,
        TripAssembler(SessionRules.of(GAP_S, GRACE_S), defer=True),
        TOPICS,
        metrics,
        clock,
        batch_trips=batch_trips,
        batch_wait_s=batch_wait_s,
        catch_up_wait_s=catch_up_wait_s,
        wall_clock=wall_clock or FakeClock(),
        commit_wait_s=commit_wait_s,
        closed_at_header=closed_at_header,
    )
    return Rig(processor, MemoryScope(), metrics, clock)


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def us(ts: datetime) -> int:
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def drive_rows(
    vehicle: str,
    start: datetime,
    n: int = 300,
    lat0: float = 52.5,
    speed_limit_mps: float | None = 8.0,
) -> list[dict[str, Any]]:
    """A straight drive east at 10-15 m/s, one ping a second (speeding, unless no limit)."""
    rows: list[dict[str, Any]] = []
    lon = 13.4
    metres_per_deg_lon = 111_320.0 * math.cos(math.radians(lat0))
    for i in range(n):
        speed = 12.5 + 2.5 * math.sin(i / 20.0)
        rows.append(
            {
                "ts": start + timedelta(seconds=i, microseconds=250_000),
                "vehicle_id": vehicle,
                "driver_id": f"D-{vehicle}",
                "lat": lat0,
                "lon": round(lon, 7),
                "speed_mps": round(speed, 3),
                "heading_deg": 90.0,
                "speed_limit_mps": speed_limit_mps,
            }
        )
        lon += speed / metres_per_deg_lon
    return rows


def expected_records(
    scorer: TripScorer, rows: list[dict[str, Any]]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(features, score records) of batch scoring on the same pings."""
    card = scorer.card
    prepared = prepare_trips(
        conform_pings(pl.DataFrame(rows)),
        card.cleaning_config,
        card.trip_config,
        card.feature_config,
        reference_time=NOW,
    )
    return prepared.features, scorer.score_trips(prepared.features, scored_at=NOW)


def lines(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return [json.loads(line) for line in frame.write_ndjson().splitlines()]


def on(messages: list[OutMessage], topic: str) -> list[OutMessage]:
    return [m for m in messages if m.topic == topic]


def after(rows: list[dict[str, Any]], seconds: float) -> datetime:
    """A moment ``seconds`` after the last of ``rows``."""
    last: datetime = rows[-1]["ts"]
    return last + timedelta(seconds=seconds)


PAST_DEADLINE_S = GAP_S + GRACE_S + 1


# -- dead letters --------------------------------------------------------------------------


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


PING = {
    "schema_version": "1.0",
    "ts": 1_772_179_200_000,
    "vehicle_id": "v1",
    "lat": 1.0,
    "lon": 2.0,
}
REJECTS = [
    pytest.param(b"\xff{", "v1", "not_json", id="not_json"),
    pytest.param(None, "v1", "not_json", id="tombstone"),
    pytest.param(b"[1, 2]", "v1", "not_an_object", id="not_an_object"),
    pytest.param(
        _json({**PING, "schema_version": "2.0"}), "v1", "unsupported_schema_version", id="v2"
    ),
    pytest.param(
        _json({k: v for k, v in PING.items() if k != "schema_version"}),
        "v1",
        "unsupported_schema_version",
        id="no_version",
    ),
    pytest.param(
        _json({k: v for k, v in PING.items() if k != "lat"}), "v1", "invalid_ping", id="no_lat"
    ),
    pytest.param(
        _json({"schema_version": "1.0", "vehicle_id": "v1", "pings": []}),
        "v1",
        "empty_batch",
        id="empty_batch",
    ),
    pytest.param(
        _json(
            {
                "schema_version": "1.0",
                "vehicle_id": "v1",
                "pings": [{"ts": 1_772_179_200_000, "lat": 1, "lon": 2, "vehicle_id": "v2"}],
            }
        ),
        "v1",
        "vehicle_mismatch",
        id="vehicle_mismatch",
    ),
    pytest.param(_json(PING), "v2", "key_mismatch", id="other_key"),
    pytest.param(_json(PING), None, "key_mismatch", id="no_key"),
]


def test_every_reject_reason_is_exercised() -> None:
    assert {p.values[2] for p in REJECTS} == set(REJECT_REASONS)


@pytest.mark.parametrize(("value", "key", "code"), REJECTS)
def test_a_rejected_message_goes_to_the_dlq_unchanged_with_reason_and_source(
    scorer: TripScorer, value: bytes | None, key: str | None, code: str
) -> None:
    rig = make_rig(scorer)
    (out,) = rig.send(value, key, 1_772_179_200_000)
    assert out.topic == TOPICS.dlq
    assert (out.key, out.value) == (key or "", value or b"")
    assert out.headers[: len(HEADERS)] == HEADERS
    assert [name for name, _ in out.headers[len(HEADERS) :]] == [REASON, SOURCE]
    reason = dict(out.headers)[REASON].decode()
    assert reason.startswith(f"{code}: ") and len(reason) > len(code) + 2
    assert dict(out.headers)[SOURCE] == b"pings/0/1"
    assert rig.sample("driverscore_stream_messages_total", outcome=code) == 1
    assert rig.sample("driverscore_stream_messages_total", outcome="accepted") == 0
    assert rig.scope.stored_keys() == 0
    assert rig.scope.shared().get("wm") is None  # event time did not move


def test_a_message_without_headers_gets_just_the_dlq_headers(scorer: TripScorer) -> None:
    rig = make_rig(scorer)
    (out,) = rig.send(b"nope", "v1", 5, headers=[])
    assert [name for name, _ in out.headers] == [REASON, SOURCE]


# -- late pings ----------------------------------------------------------------------------


def test_a_message_of_only_late_pings_goes_to_the_dlq_with_its_original_bytes(
    scorer: TripScorer,
) -> None:
    rig = make_rig(scorer)
    lead = START + timedelta(hours=2)
    assert (
        rig.send(
            encode_ping({"ts": lead, "vehicle_id": "lead", "lat": 1.0, "lon": 2.0}),
            "lead",
            ms(lead),
        )
        == []
    )
    late_rows = [
        {"ts": lead - timedelta(seconds=GAP_S + GRACE_S + 1 + i), "lat": 1.0, "lon": 2.0}
        for i in range(3)
    ]
    value = encode_batch("slow", late_rows)
    (out,) = rig.send(value, "slow", 1234)
    assert (out.topic, out.key, out.value) == (TOPICS.dlq, "slow", value)
    headers = dict(out.headers)
    assert out.headers[: len(HEADERS)] == HEADERS
    assert headers[REASON].decode().startswith("late_ping: 3 ping(s)")
    assert headers[SOURCE] == b"pings/0/2"
    assert rig.sample("driverscore_stream_late_pings_total") == 3
    assert rig.sample("driverscore_stream_messages_total", outcome="accepted") == 2
    assert rig.scope.stored_keys() == 2  # lead's meta (holding its ping), slow's meta
    assert rig.scope.stored_pings("slow") == 0


def test_late_pings_behind_a_closed_trip_go_to_the_dlq_as_a_batch_of_just_them(
    scorer: TripScorer,
) -> None:
    rig = make_rig(scorer)
    rows = drive_rows("v1", START, n=120)
    rig.drive("v1", rows)
    rig.clock_message(after(rows, PAST_DEADLINE_S))  # closes (and scores) the trip
    behind = [
        {"ts": START + timedelta(seconds=30, microseconds=123_457), "lat": 52.5, "lon": 13.41},
        {"ts": after(rows, 10) + timedelta(microseconds=999_999), "lat": 52.5, "lon": 13.42},
    ]
    fresh = [
        {"ts": after(rows, PAST_DEADLINE_S + 1), "lat": 52.5, "lon": 13.43},
    ]
    value = encode_batch("v1", [behind[0], fresh[0], behind[1]])
    (out,) = rig.send(value, "v1", 777)
    assert (out.topic, out.key) == (TOPICS.dlq, "v1")
    assert out.value != value
    assert decode_message(out.value, "v1").pings == [
        {"ts": us(p["ts"]), "vehicle_id": "v1", "lat": p["lat"], "lon": p["lon"]} for p in behind
    ]
    assert out.headers[: len(HEADERS)] == HEADERS
    assert dict(out.headers)[REASON].decode().startswith("late_ping: 2 ping(s)")
    assert rig.sample("driverscore_stream_late_pings_total") == 2
    # The fresh ping opened a session of its own: the next close hands it on alone.
    sessions = rig.scope.open_sessions("v1")
    assert [(s["start"], s["n"]) for s in sessions] == [(us(fresh[0]["ts"]), 1)]


# -- trip outputs --------------------------------------------------------------------------


def model(
    scorer: TripScorer,
    *,
    threshold: float | None = None,
    version: str = "1",
    predict_proba: Any = None,
) -> TripScorer:
    """``scorer`` with another decision threshold, version or probability function."""
    card = scorer.card
    if threshold is not None:
        card = card.model_copy(update={"decision_threshold": threshold})
    return TripScorer(
        predict_proba or scorer.predict_proba, card, "driverscore", version, "champion"
    )


def probability(scorer: TripScorer, rows: list[dict[str, Any]]) -> float:
    _, records = expected_records(scorer, rows)
    (p,) = records["risk_probability"].to_list()
    return float(p)


def test_a_closed_trip_publishes_features_score_alert_and_decision_like_batch_scoring(
    scorer: TripScorer,
) -> None:
    alerting = model(scorer, threshold=0.0)  # every trip reaches it
    rig = make_rig(alerting)
    rows = drive_rows("v1", START)
    assert rig.drive("v1", rows) == []
    out = rig.clock_message(after(rows, PAST_DEADLINE_S))
    features, records = expected_records(alerting, rows)
    assert records.height == 1
    (trip_id,) = records["trip_id"].to_list()
    assert trip_id == f"v1:{ms(rows[0]['ts'])}"
    assert [m.topic for m in out] == [
        TOPICS.trip_features,
        TOPICS.routes,
        TOPICS.scores,
        TOPICS.alerts,
        TOPICS.predictions,
    ]
    assert [m.key for m in out] == ["v1", "v1", "v1", "v1", "D-v1"]  # decisions: key = driver
    trigger = str(ms(after(rows, PAST_DEADLINE_S))).encode()
    assert all(m.headers == [(CLOSE_TRIGGER_HEADER, trigger)] for m in out)
    feature_msg, route_msg, score_msg, alert_msg, decision = (json.loads(m.value) for m in out)
    assert feature_msg == lines(features)[0]
    # The route: the trip's cleaned fixes thinned, from its first to its last.
    assert (route_msg["vehicle_id"], route_msg["trip_id"]) == ("v1", trip_id)
    assert 2 <= route_msg["point_count"] == len(route_msg["route"]) <= len(rows)
    assert route_msg["route"][0]["lat"] == rows[0]["lat"]
    # Its points carry the event flags; the flagged ones are the trip's counted events.
    for flag, count in (
        ("hard_brake", "hard_brake_count"),
        ("harsh_accel", "harsh_accel_count"),
        ("harsh_corner", "harsh_corner_count"),
    ):
        assert all(isinstance(p[flag], bool) for p in route_msg["route"])
        assert sum(p[flag] for p in route_msg["route"]) == feature_msg[count], flag
    assert feature_msg["speeding_share"] > 0  # 10-15 m/s, limit 8 m/s
    assert any(p["speeding"] for p in route_msg["route"])
    assert score_msg == lines(records)[0]
    assert alert_msg == {
        **score_msg,
        "alert": alert_text(score_msg["risk_probability"], alerting.card),
    }
    assert decision["trip_id"] == trip_id and decision["vehicle_id"] == "v1"
    assert (decision["answered_by"], decision["rollout_mode"]) == ("champion", "champion")
    assert decision["champion_score"] == score_msg["score"]
    assert decision["challenger_version"] is None
    assert rig.sample("driverscore_stream_trips_total", outcome="scored") == 1
    assert rig.sample("driverscore_stream_alerts_total") == 1
    assert rig.sample("driverscore_stream_published_total", topic=TOPICS.predictions) == 1
    assert rig.scope.stored_keys() == 1  # the trip's chunks are gone


def test_a_trip_alerts_when_its_risk_reaches_the_cards_threshold_and_not_below(
    scorer: TripScorer,
) -> None:
    rows = drive_rows("v1", START)
    p = probability(scorer, rows)
    # At the threshold: an alert naming the threshold and the score it maps to.
    at = model(scorer, threshold=p)
    rig = make_rig(at)
    rig.drive("v1", rows)
    out = rig.clock_message(after(rows, PAST_DEADLINE_S))
    (alert,) = (json.loads(m.value) for m in on(out, TOPICS.alerts))
    cutoff = float(at.card.score_mapping.score([p])[0])
    assert alert["alert"] == (
        f"risk {p:.3f} at or above the model's alert threshold {p:.3f} "
        f"(score {cutoff:.1f} or below)"
    )
    assert rig.sample("driverscore_stream_alerts_total") == 1
    # Just above the trip's risk: no alert, whatever its score.
    above = model(scorer, threshold=math.nextafter(p, 1.0))
    rig = make_rig(above)
    rig.drive("v1", rows)
    out = rig.clock_message(after(rows, PAST_DEADLINE_S))
    assert [m.topic for m in out] == [
        TOPICS.trip_features,
        TOPICS.routes,
        TOPICS.scores,
        TOPICS.predictions,
    ]
    assert rig.sample("driverscore_stream_alerts_total") == 0


def test_a_trip_closed_by_another_vehicle_is_keyed_by_its_own_vehicle(scorer: TripScorer) -> None:
    rig = make_rig(model(scorer, threshold=1.0))  # no alert below a risk of 1
    rows = drive_rows("v1", START)
    rig.drive("v1", rows)
    other = after(rows, PAST_DEADLINE_S)
    value = encode_ping({"ts": other, "vehicle_id": "v2", "lat": 48.1, "lon": 11.6})
    out = rig.send(value, "v2", 98765)
    assert [(m.topic, m.key) for m in out] == [
        (TOPICS.trip_features, "v1"),
        (TOPICS.routes, "v1"),
        (TOPICS.scores, "v1"),
        (TOPICS.predictions, "D-v1"),
    ]
    assert all(m.headers == [(CLOSE_TRIGGER_HEADER, b"98765")] for m in out)
    _, records = expected_records(scorer, rows)
    assert json.loads(out[2].value) == lines(records)[0]


def test_trips_of_two_vehicles_with_the_same_given_trip_id_keep_their_own_alerts(
    scorer: TripScorer,
) -> None:
    risky = [{**r, "trip_id": "T1"} for r in drive_rows("v1", START)]
    calm = [
        {**r, "trip_id": "T1"} for r in drive_rows("v2", START, lat0=48.0, speed_limit_mps=None)
    ]
    p_risky, p_calm = probability(scorer, risky), probability(scorer, calm)
    assert p_calm < p_risky
    rig = make_rig(model(scorer, threshold=p_risky), batch_trips=2, batch_wait_s=math.inf)
    rig.drive("v1", risky)
    rig.drive("v2", calm)
    out = rig.clock_message(after(risky, PAST_DEADLINE_S))
    scores = {m.key: json.loads(m.value) for m in on(out, TOPICS.scores)}
    assert {k: (r["trip_id"], r["risk_probability"]) for k, r in scores.items()} == {
        "v1": ("T1", p_risky),
        "v2": ("T1", p_calm),
    }
    (alert,) = on(out, TOPICS.alerts)
    assert alert.key == "v1"
    assert json.loads(alert.value)["risk_probability"] == p_risky


def test_a_session_too_short_to_score_publishes_nothing(scorer: TripScorer) -> None:
    rig = make_rig(scorer)
    rows = drive_rows("v1", START, n=5)
    rig.drive("v1", rows)
    assert rig.clock_message(after(rows, PAST_DEADLINE_S)) == []
    assert rig.sample("driverscore_stream_trips_total", outcome="set_aside") == 1
    assert rig.sample("driverscore_stream_quarantined_pings_total", reason="short_trip") == 5
    assert rig.scope.stored_keys() == 1


def test_a_non_finite_model_output_is_set_aside_on_the_dlq_never_published_as_a_score(
    scorer: TripScorer,
) -> None:
    def broken(x: Any) -> Any:
        return scorer.predict_proba(x) * math.nan

    rig = make_rig(model(scorer, threshold=0.0, predict_proba=broken))
    rows = drive_rows("v1", START)
    rig.drive("v1", rows)
    out = rig.clock_message(after(rows, PAST_DEADLINE_S))
    (dead,) = out
    assert (dead.topic, dead.key) == (TOPICS.dlq, "v1")
    headers = dict(dead.headers)
    assert headers[REASON].decode().startswith("non_finite_output: ")
    assert headers[SOURCE] == f"pings/0/{rig.offset}".encode()
    assert headers[CLOSE_TRIGGER_HEADER] == str(ms(after(rows, PAST_DEADLINE_S))).encode()
    body = json.loads(dead.value)
    assert (body["trip_id"], body["reason"]) == (f"v1:{ms(rows[0]['ts'])}", "non_finite_output")
    assert body["ping_count"] == len(rows)  # the trip's feature row comes along
    assert rig.sample("driverscore_stream_trips_total", outcome="set_aside") == 1
    assert rig.sample("driverscore_stream_trips_total", outcome="scored") == 0
    assert (
        rig.sample("driverscore_stream_set_aside_total", reason="non_finite_output", role="answer")
        == 1
    )


def rollout_rig(scorer: TripScorer, policy: RolloutPolicy) -> tuple[Rig, TripScorer, TripScorer]:
    """A champion (version 1) and a challenger (version 2) that scores a little riskier."""
    champion = model(scorer, threshold=1.0)

    def riskier(x: Any) -> Any:
        return scorer.predict_proba(x) ** 0.9

    challenger = model(scorer, threshold=1.0, version="2", predict_proba=riskier)

    class Models:
        def current(self) -> ScoringModels:
            return ScoringModels(champion, challenger)

    step = TripScoringStep(Models(), StreamMetrics(), now=lambda: NOW, policy=policy)
    return make_rig(scorer, step=step), champion, challenger


@pytest.mark.parametrize(
    ("percent", "answering", "shadowing"),
    [(100.0, "challenger", "champion"), (0.0, "champion", "challenger")],
)
def test_canary_the_drivers_model_answers_and_the_other_scores_the_trip_as_shadow(
    scorer: TripScorer, percent: float, answering: str, shadowing: str
) -> None:
    policy = RolloutPolicy(mode="canary", challenger_percent=percent)
    rig, champion, challenger = rollout_rig(scorer, policy)
    rows = drive_rows("v1", START)
    rig.drive("v1", rows)
    out = rig.clock_message(after(rows, PAST_DEADLINE_S))
    assert [(m.topic, m.key) for m in out] == [
        (TOPICS.trip_features, "v1"),
        (TOPICS.routes, "v1"),
        (TOPICS.scores, "v1"),
        (TOPICS.shadow_scores, "v1"),
        (TOPICS.predictions, "D-v1"),
    ]
    answer, shadowed, decision = (json.loads(m.value) for m in out[2:])
    versions = {"champion": "1", "challenger": "2"}
    assert (answer["model_role"], answer["model_version"]) == (answering, versions[answering])
    assert (shadowed["model_role"], shadowed["model_version"]) == ("shadow", versions[shadowing])
    assert answer["trip_id"] == shadowed["trip_id"] == decision["trip_id"]
    _, expected_champion = expected_records(champion, rows)
    _, expected_challenger = expected_records(challenger, rows)
    scores = {"champion": answer, "challenger": shadowed}
    if answering == "challenger":
        scores = {"champion": shadowed, "challenger": answer}
    assert scores["champion"]["score"] == expected_champion["score"][0]
    assert scores["challenger"]["score"] == expected_challenger["score"][0]
    assert scores["champion"]["score"] != scores["challenger"]["score"]
    assert decision["rollout_mode"] == "canary" and decision["answered_by"] == answering
    assert (decision["champion_version"], decision["challenger_version"]) == ("1", "2")
    assert decision["champion_score"] == scores["champion"]["score"]
    assert decision["challenger_score"] == scores["challenger"]["score"]
    assert decision["challenger_probability"] == scores["challenger"]["risk_probability"]
    assert rig.sample("driverscore_stream_model", role="champion", version="1") == 1
    assert rig.sample("driverscore_stream_model", role="challenger", version="2") == 1


def test_shadow_mode_the_champion_answers_and_the_challengers_record_goes_to_the_shadow_topic(
    scorer: TripScorer,
) -> None:
    rig, _, _ = rollout_rig(scorer, RolloutPolicy(mode="shadow"))
    rows = drive_rows("v1", START)
    rig.drive("v1", rows)
    out = rig.clock_message(after(rows, PAST_DEADLINE_S))
    assert [m.topic for m in out] == [
        TOPICS.trip_features,
        TOPICS.routes,
        TOPICS.scores,
        TOPICS.shadow_scores,
        TOPICS.predictions,
    ]
    champion, shadowed, decision = (json.loads(m.value) for m in out[2:])
    assert (champion["model_role"], champion["model_version"]) == ("champion", "1")
    assert (shadowed["model_role"], shadowed["model_version"]) == ("shadow", "2")
    assert decision["answered_by"] == "champion"
    assert decision["challenger_score"] == shadowed["score"]


def test_champion_mode_scores_with_the_champion_only(scorer: TripScorer) -> None:
    rig, _, _ = rollout_rig(scorer, RolloutPolicy(mode="champion"))
    rows = drive_rows("v1", START)
    rig.drive("v1", rows)
    out = rig.clock_message(after(rows, PAST_DEADLINE_S))
    assert [m.topic for m in out] == [
        TOPICS.trip_features,
        TOPICS.routes,
        TOPICS.scores,
        TOPICS.predictions,
    ]
    decision = json.loads(out[3].value)
    assert decision["challenger_version"] is None and decision["challenger_score"] is None


# -- batching ------------------------------------------------------------------------------


def three_trips() -> dict[str, list[dict[str, Any]]]:
    """Three vehicles driving one after the other, each start closing the trip before."""
    trips: dict[str, list[dict[str, Any]]] = {}
    start = START
    for i, vehicle in enumerate(("a", "b", "c")):
        trips[vehicle] = drive_rows(vehicle, start, n=200 + 50 * i, lat0=50.0 + i)
        start = after(trips[vehicle], PAST_DEADLINE_S + 60)
    return trips


def test_with_batch_trips_three_nothing_is_published_until_the_third_trip_closes(
    scorer: TripScorer,
) -> None:
    rig = make_rig(model(scorer, threshold=0.0), batch_trips=3, batch_wait_s=math.inf)
    trips = three_trips()
    for vehicle, rows in trips.items():
        assert rig.drive(vehicle, rows) == []
    assert rig.processor.waiting == {0: 0.0}
    assert rig.scope.shared().get("pending") is not None
    closing = after(trips["c"], PAST_DEADLINE_S)
    out = rig.send(encode_ping({"ts": closing, "vehicle_id": "d", "lat": 1.0, "lon": 2.0}), "d", 55)
    assert [m.key for m in out] == [k for v in "abc" for k in (v, v, v, v, f"D-{v}")]
    assert [m.topic for m in out] == [
        TOPICS.trip_features,
        TOPICS.routes,
        TOPICS.scores,
        TOPICS.alerts,
        TOPICS.predictions,
    ] * 3
    assert all(m.headers == [(CLOSE_TRIGGER_HEADER, b"55")] for m in out)
    for vehicle, rows in trips.items():
        features, records = expected_records(scorer, rows)
        (score,) = (json.loads(m.value) for m in on(out, TOPICS.scores) if m.key == vehicle)
        (feature,) = (
            json.loads(m.value) for m in on(out, TOPICS.trip_features) if m.key == vehicle
        )
        assert score == lines(records)[0]
        assert feature == lines(features)[0]
    assert rig.processor.waiting == {}
    assert rig.scope.stored_keys() == 4  # four vehicles' metas (d's holds its open trip)
    assert rig.sample("driverscore_stream_trips_total", outcome="scored") == 3


def test_scores_equal_batch_scoring_of_the_same_pings(scorer: TripScorer) -> None:
    rig = make_rig(scorer, batch_trips=3, batch_wait_s=math.inf)
    trips = three_trips()
    for vehicle, rows in trips.items():
        rig.drive(vehicle, rows, per_message=7)
    rig.clock_message(after(trips["c"], PAST_DEADLINE_S))
    got = {
        json.loads(m.value)["trip_id"]: json.loads(m.value)["score"]
        for m in on(rig.sent, TOPICS.scores)
    }
    every = [r for rows in trips.values() for r in rows]
    _, records = expected_records(scorer, every)
    assert records.height == 3
    assert got == dict(zip(records["trip_id"].to_list(), records["score"].to_list(), strict=True))


def test_a_clock_message_flushes_pending_trips_even_from_1970(scorer: TripScorer) -> None:
    rig = make_rig(model(scorer, threshold=1.0), batch_trips=3, batch_wait_s=math.inf)
    trips = three_trips()
    rig.drive("a", trips["a"])
    assert rig.drive("b", trips["b"][:30]) == []  # closes a: pending, not published
    out = rig.send(encode_clock(datetime(1970, 1, 1, tzinfo=UTC)), CLOCK_KEY, 31)
    assert [(m.topic, m.key) for m in out] == [
        (TOPICS.trip_features, "a"),
        (TOPICS.routes, "a"),
        (TOPICS.scores, "a"),
        (TOPICS.predictions, "D-a"),
    ]
    assert all(m.headers == [(CLOSE_TRIGGER_HEADER, b"31")] for m in out)
    assert rig.processor.waiting == {}
    # The flush tick moved no event time: b's trip goes on.
    assert rig.drive("b", trips["b"][30:]) == []
    sessions = rig.scope.open_sessions("b")
    assert [s["n"] for s in sessions] == [len(trips["b"])]


def test_batch_wait_flushes_on_the_next_message_once_the_first_trip_waited_long_enough(
    scorer: TripScorer,
) -> None:
    rig = make_rig(model(scorer, threshold=1.0), batch_trips=10, batch_wait_s=5.0)
    trips = three_trips()
    rig.clock.now = 100.0
    rig.drive("a", trips["a"])
    assert rig.drive("b", trips["b"][:30]) == []  # a closes and waits from 100
    assert rig.processor.waiting == {0: 100.0}
    rig.clock.now = 104.9
    assert rig.processor.overdue() == []
    assert rig.drive("b", trips["b"][30:60]) == []
    rig.clock.now = 105.0
    assert rig.processor.overdue() == [0]
    out = rig.drive("b", trips["b"][60:90])
    assert [(m.topic, m.key) for m in out] == [
        (TOPICS.trip_features, "a"),
        (TOPICS.routes, "a"),
        (TOPICS.scores, "a"),
        (TOPICS.predictions, "D-a"),
    ]
    trigger = str(ms(trips["b"][89]["ts"])).encode()
    assert all(m.headers == [(CLOSE_TRIGGER_HEADER, trigger)] for m in out)
    assert rig.processor.waiting == {}
    assert rig.processor.overdue() == []


@pytest.mark.parametrize(("behind_s", "published_at"), [(0.05, 100.2), (5.0, 101.0)])
def test_closed_trips_wait_longer_only_while_the_processor_reads_old_messages(
    scorer: TripScorer, behind_s: float, published_at: float
) -> None:
    # Messages read 50 ms after they were written: a live processor keeps to the batch
    # wait. Read 5 s after: it works through a backlog and scores bigger batches, waiting
    # up to the catch-up wait.
    wall = FakeClock()
    rig = make_rig(
        model(scorer, threshold=1.0),
        batch_trips=10,
        batch_wait_s=0.1,
        catch_up_wait_s=1.0,
        wall_clock=wall,
    )
    trips = three_trips()
    rows = trips["b"]
    rig.clock.now = 100.0
    rig.drive("a", trips["a"])
    assert rig.drive("b", rows[:30]) == []  # a closes and waits from 100
    published: list[float] = []
    for i, now in enumerate((100.05, 100.2, 100.5, 100.99, 101.0)):
        rig.clock.now = now
        written_ms = ms(rows[30 + i]["ts"])  # the message's Kafka timestamp
        wall.now = written_ms / 1000 + behind_s  # read this long after it was written
        out = rig.send(encode_batch("b", rows[30 + i : 31 + i]), "b", written_ms)
        if out:
            assert [(m.topic, m.key) for m in on(out, TOPICS.scores)] == [(TOPICS.scores, "a")]
            published.append(now)
    assert published == [published_at]
    assert rig.processor.waiting == {}


def test_overdue_lists_each_waiting_partition_past_the_wait(scorer: TripScorer) -> None:
    rig = make_rig(model(scorer, threshold=1.0), batch_trips=10, batch_wait_s=2.0)
    trips = three_trips()
    first, second = rig.scope, MemoryScope(("pings", 1))

    def close_a_trip(vehicle: str) -> None:
        rows = trips[vehicle][:90]
        rig.drive(vehicle, rows)
        quiet = after(rows, PAST_DEADLINE_S)
        ping = {"ts": quiet, "vehicle_id": "z", "lat": 1.0, "lon": 2.0}
        assert rig.send(encode_ping(ping), "z", ms(quiet)) == []

    assert rig.processor.overdue() == []
    rig.clock.now = 10.0
    close_a_trip("a")
    rig.clock.now = 11.0
    rig.scope = second
    close_a_trip("b")
    assert rig.processor.waiting == {0: 10.0, ("pings", 1): 11.0}
    rig.clock.now = 11.9
    assert rig.processor.overdue() == []
    rig.clock.now = 12.5
    assert rig.processor.overdue() == [0]
    rig.clock.now = 13.0
    assert set(rig.processor.overdue()) == {0, ("pings", 1)}
    # The flush tick of the first partition scores its trip; the second still waits.
    rig.scope = first
    out = rig.send(encode_clock(datetime(1970, 1, 1, tzinfo=UTC)), CLOCK_KEY, 0)
    assert {m.key for m in out} == {"a", "D-a"}
    assert rig.processor.overdue() == [("pings", 1)]


def test_the_stream_follows_the_rollout_policy_its_model_source_polls(scorer: TripScorer) -> None:
    champion = model(scorer, threshold=1.0)
    challenger = model(scorer, threshold=1.0, version="2")
    stored: list[RolloutPolicy] = []

    class PolledRollout:
        """A model source that, like ``PolledModels``, knows the registry's policy."""

        def current(self) -> ScoringModels:
            return ScoringModels(champion, challenger)

        def rollout(self, configured: RolloutPolicy) -> RolloutPolicy:
            return stored[-1] if stored else configured

    step = TripScoringStep(
        PolledRollout(), StreamMetrics(), now=lambda: NOW, policy=RolloutPolicy()
    )
    rig = make_rig(scorer, step=step)
    first = drive_rows("v1", START)
    rig.drive("v1", first)
    out = rig.clock_message(after(first, PAST_DEADLINE_S))
    assert [json.loads(m.value)["model_role"] for m in out if m.topic == TOPICS.scores] == [
        "champion"
    ]
    # The decision job (or a person) stores a full canary in the registry.
    stored.append(RolloutPolicy(mode="canary", challenger_percent=100))
    second = drive_rows("v2", after(first, PAST_DEADLINE_S + 60))
    rig.drive("v2", second)
    out = rig.clock_message(after(second, PAST_DEADLINE_S))
    answers = [json.loads(m.value) for m in out if m.topic == TOPICS.scores]
    assert [(a["model_role"], a["model_version"]) for a in answers] == [("challenger", "2")]


def test_the_closed_at_header_says_when_each_trip_closed_not_when_it_was_published(
    scorer: TripScorer,
) -> None:
    rig = make_rig(
        model(scorer, threshold=1.0), batch_trips=10, batch_wait_s=5.0, closed_at_header=True
    )
    trips = three_trips()
    rig.drive("a", trips["a"])
    rig.drive("b", trips["b"])  # its first message closes a, which waits
    a_closed = ms(trips["b"][29]["ts"])
    rig.drive("c", trips["c"][:30])  # closes b, which waits
    b_closed = ms(trips["c"][29]["ts"])
    rig.clock.now = 5.0
    out = rig.drive("c", trips["c"][30:60])
    trigger = str(ms(trips["c"][59]["ts"])).encode()
    assert sorted({m.key for m in on(out, TOPICS.scores)}) == ["a", "b"]
    for m in out:
        vehicle = m.key.removeprefix("D-")
        closed = {"a": a_closed, "b": b_closed}[vehicle]
        assert m.headers == [
            (CLOSE_TRIGGER_HEADER, trigger),
            (CLOSED_AT_HEADER, str(closed).encode()),
        ]


def test_exactly_once_trips_wait_for_the_commit_and_every_partitions_are_scored_together(
    scorer: TripScorer,
) -> None:
    rig = make_rig(
        model(scorer, threshold=1.0),
        batch_trips=10,
        batch_wait_s=0.1,
        commit_wait_s=0.2,
        closed_at_header=True,
    )
    other = MemoryScope(1)

    def send_other(vehicle: str, rows: list[dict[str, Any]]) -> list[OutMessage]:
        value = encode_batch(vehicle, rows)
        return rig.processor.process(value, vehicle, ms(rows[-1]["ts"]), [], other, "pings/1/0")

    trips = three_trips()
    rig.drive("a", trips["a"])
    assert rig.drive("b", trips["b"][:30]) == []  # closes a on partition 0
    x = drive_rows("x", START, lat0=45.0)
    for i in range(0, len(x), 30):
        assert send_other("x", x[i : i + 30]) == []
    y = drive_rows("y", after(x, PAST_DEADLINE_S), n=30, lat0=46.0)
    assert send_other("y", y) == []  # closes x on partition 1
    assert rig.processor.waiting == {0: 0.0, 1: 0.0}
    # Past the batch wait, but outputs would only be read at the commit: still waiting.
    rig.clock.now = 0.15
    assert rig.drive("b", trips["b"][30:60]) == []
    assert rig.processor.overdue() == []  # no tick while a commit is to come
    # The checkpoint commits after this message: both partitions' trips, one batch.
    out = rig.processor.process(
        encode_batch("b", trips["b"][60:90]),
        "b",
        ms(trips["b"][89]["ts"]),
        [],
        rig.scope,
        "pings/0/9",
        {0: rig.scope, 1: other},
    )
    assert sorted(m.key for m in on(out, TOPICS.scores)) == ["a", "x"]
    closed = {"a": ms(trips["b"][29]["ts"]), "x": ms(y[-1]["ts"])}
    trigger = str(ms(trips["b"][89]["ts"])).encode()
    for m in on(out, TOPICS.scores):
        assert m.headers == [
            (CLOSE_TRIGGER_HEADER, trigger),
            (CLOSED_AT_HEADER, str(closed[m.key]).encode()),
        ]
    assert rig.processor.waiting == {}
    assert rig.sample("driverscore_stream_trips_total", outcome="scored") == 2
    # No message at a commit: a quiet partition's trips get a tick once they waited the
    # commit interval and the batch wait.
    z = drive_rows("z", after(y, 5), n=40, lat0=47.0)
    send_other("z", z)
    send_other("w", drive_rows("w", after(z, PAST_DEADLINE_S), n=5, lat0=48.0))
    assert rig.processor.waiting == {1: 0.15}
    rig.clock.now = 0.44
    assert rig.processor.overdue() == []
    rig.clock.now = 0.45
    assert rig.processor.overdue() == [1]


def test_trips_waiting_for_a_commit_are_scored_ahead_of_it_by_the_recent_scoring_time(
    scorer: TripScorer,
) -> None:
    rig = make_rig(model(scorer, threshold=1.0), batch_trips=10, commit_wait_s=0.2)
    close_sessions = rig.processor.step.close_sessions

    def scoring_takes_50_ms(sessions: list[Any]) -> list[Any]:
        rig.clock.now += 0.05
        return close_sessions(sessions)

    rig.processor.step.close_sessions = scoring_takes_50_ms  # type: ignore[method-assign]
    assert rig.processor.commit_lead_s == 0.1  # nothing timed yet: the most, half the interval
    trips = three_trips()
    rig.drive("a", trips["a"])
    assert rig.drive("b", trips["b"][:30]) == []  # closes a
    out = rig.processor.process(
        encode_batch("b", trips["b"][30:60]),
        "b",
        ms(trips["b"][59]["ts"]),
        [],
        rig.scope,
        "pings/0/3",
        {0: rig.scope},
    )
    assert [m.key for m in on(out, TOPICS.scores)] == ["a"]
    assert rig.processor.commit_scoring_s == pytest.approx(0.05)  # the first: as it is
    assert rig.processor.commit_lead_s == pytest.approx(1.5 * 0.05)
    # Scoring outside a commit (the batch is full) does not count.
    rig.processor.batch_trips = 1
    rig.drive("b", trips["b"][60:])
    rig.drive("c", drive_rows("c", after(trips["b"], PAST_DEADLINE_S), n=5))  # closes b
    assert rig.sample("driverscore_stream_trips_total", outcome="scored") == 2
    assert rig.processor.commit_scoring_s == pytest.approx(0.05)
    # At most half the commit interval, however long scoring takes.
    rig.processor.commit_scoring_s = 1.0
    assert rig.processor.commit_lead_s == 0.1
    # Without a commit to wait for (at-least-once), no lead.
    assert make_rig(scorer).processor.commit_lead_s == 0.0


def test_when_one_partitions_trips_are_scored_the_other_partitions_waiting_go_with_them(
    scorer: TripScorer,
) -> None:
    rig = make_rig(model(scorer, threshold=1.0), batch_trips=10, batch_wait_s=0.1)
    other = MemoryScope(1)
    trips = three_trips()
    rig.drive("a", trips["a"])
    assert rig.drive("b", trips["b"][:30]) == []  # closes a on partition 0, at 0.0
    rig.clock.now = 0.05
    x = drive_rows("x", START, lat0=45.0)
    for i in range(0, len(x), 30):
        rig.processor.process(encode_batch("x", x[i : i + 30]), "x", 1, [], other, "pings/1/0")
    y = drive_rows("y", after(x, PAST_DEADLINE_S), n=30, lat0=46.0)
    rig.processor.process(encode_batch("y", y), "y", 2, [], other, "pings/1/1")
    assert rig.processor.waiting == {0: 0.0, 1: 0.05}  # x waits on partition 1
    rig.clock.now = 0.1  # a has waited long enough, x not yet: both go
    out = rig.processor.process(
        encode_batch("b", trips["b"][30:60]),
        "b",
        3,
        [],
        rig.scope,
        "pings/0/2",
        partners=lambda: {0: rig.scope, 1: other},
    )
    assert sorted(m.key for m in on(out, TOPICS.scores)) == ["a", "x"]
    assert rig.processor.waiting == {}
    assert other.shared().get("pending") is None
