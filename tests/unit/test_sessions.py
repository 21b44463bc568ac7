"""Trips of a ping stream (``domain/sessions.py``): joining, merging, closing, late pings."""

from __future__ import annotations

import random
from typing import Any

import polars as pl
import pytest

from driverscore.domain.config import TripConfig
from driverscore.domain.sessions import (
    PART_MEMORY,
    TAIL_PINGS,
    Assembled,
    ClosedSession,
    MemoryScope,
    SessionRules,
    TripAssembler,
)
from driverscore.domain.trips import assign_trips

S = 1_000_000  # µs per second
GAP = 300 * S
GRACE = 30 * S
RULES = SessionRules.of(300, 30)
T0 = 1_767_601_800_000_000  # 2026-01-05 08:30 UTC, epoch µs


def ping(
    ts: int, vehicle: str = "v1", trip: str | None = None, lat: float = 52.5
) -> dict[str, Any]:
    p: dict[str, Any] = {"ts": ts, "vehicle_id": vehicle, "lat": lat, "lon": 13.4}
    if trip is not None:
        p["trip_id"] = trip
    return p


def feed(
    assembler: TripAssembler, scope: MemoryScope, pings: list[dict[str, Any]]
) -> tuple[list[ClosedSession], list[dict[str, Any]]]:
    """Each ping as a message of its own; everything closed and late along the way."""
    closed: list[ClosedSession] = []
    late: list[dict[str, Any]] = []
    for p in pings:
        out = assembler.add(scope, p["vehicle_id"], [p])
        closed.extend(out.closed)
        late.extend(out.late)
    return closed, late


def stamps(session: ClosedSession) -> list[int]:
    return [int(p["ts"]) for p in session.pings]


def stored_pings(scope: MemoryScope, vehicle: str) -> int:
    """Pings a vehicle's state holds (in chunks and in its meta record's session tails)."""
    return scope.stored_pings(vehicle)


def test_rules_are_kept_in_microseconds() -> None:
    assert SessionRules(gap_us=GAP, grace_us=GRACE, max_trip_pings=50_000) == RULES
    assert SessionRules.of(0.5, 1e-6, 7) == SessionRules(500_000, 1, 7)


# -- joining and cutting -------------------------------------------------------------------


def test_a_ping_exactly_one_gap_after_the_last_joins_one_more_microsecond_starts_anew() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    closed, late = feed(assembler, scope, [ping(T0), ping(T0 + GAP), ping(T0 + 2 * GAP + 1)])
    assert closed == [] and late == []
    sessions = assembler.close_all(scope).closed
    assert [stamps(s) for s in sessions] == [[T0, T0 + GAP], [T0 + 2 * GAP + 1]]
    assert [(s.start_us, s.last_us) for s in sessions] == [
        (T0, T0 + GAP),
        (T0 + 2 * GAP + 1, T0 + 2 * GAP + 1),
    ]
    assert {s.reason for s in sessions} == {"end"}


def test_a_ping_one_gap_before_the_start_joins_one_more_microsecond_does_not() -> None:
    assembler, scope = TripAssembler(SessionRules(GAP, 2 * GAP)), MemoryScope()
    feed(assembler, scope, [ping(T0), ping(T0 - GAP)])
    assert [stamps(s) for s in assembler.close_all(scope).closed] == [[T0, T0 - GAP]]

    assembler, scope = TripAssembler(SessionRules(GAP, 2 * GAP)), MemoryScope()
    feed(assembler, scope, [ping(T0), ping(T0 - GAP - 1)])
    sessions = assembler.close_all(scope).closed
    assert sorted(stamps(s) for s in sessions) == [[T0 - GAP - 1], [T0]]


def test_out_of_order_pings_within_the_gap_join_even_before_the_start() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    order = [T0 + 100 * S, T0 + 50 * S, T0 + 120 * S, T0 - 200 * S, T0 + 110 * S]
    closed, late = feed(assembler, scope, [ping(ts) for ts in order])
    assert closed == [] and late == []
    (session,) = assembler.close_all(scope).closed
    assert stamps(session) == order  # arrival order
    assert (session.start_us, session.last_us) == (T0 - 200 * S, T0 + 120 * S)


def test_a_ping_bridging_two_sessions_merges_them_and_every_ping_comes_back_once() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    a = [T0, T0 + 10 * S]
    b = [T0 + 10 * S + GAP + 10 * S, T0 + 10 * S + GAP + 20 * S]  # 310 s after a: apart
    feed(assembler, scope, [ping(ts) for ts in a + b])
    bridge = T0 + 165 * S  # within a gap of both
    closed, late = feed(assembler, scope, [ping(bridge)])
    assert closed == [] and late == []
    (session,) = assembler.close_all(scope).closed
    assert stamps(session) == [*a, *b, bridge]
    assert (session.start_us, session.last_us) == (a[0], b[-1])
    assert stored_pings(scope, "v1") == 0


def test_a_batch_bridging_two_sessions_merges_them_with_its_other_pings() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0), ping(T0 + 320 * S)])
    batch = [ping(T0 + 5 * S), ping(T0 + 315 * S), ping(T0 + 160 * S), ping(T0 + 330 * S)]
    out = assembler.add(scope, "v1", batch)
    assert out.closed == [] and out.late == []
    (session,) = assembler.close_all(scope).closed
    assert sorted(stamps(session)) == sorted(
        [T0, T0 + 320 * S, T0 + 5 * S, T0 + 315 * S, T0 + 160 * S, T0 + 330 * S]
    )
    assert len(session.pings) == 6


def test_vehicles_never_share_a_session() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0, "a"), ping(T0 + S, "b"), ping(T0 + 2 * S, "a")])
    sessions = assembler.close_all(scope).closed
    assert {s.vehicle_id: stamps(s) for s in sessions} == {
        "a": [T0, T0 + 2 * S],
        "b": [T0 + S],
    }


# -- closing by the watermark --------------------------------------------------------------


def test_a_session_closes_only_once_another_vehicle_takes_the_watermark_past_its_deadline() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0), ping(T0 + 60 * S)])
    last = T0 + 60 * S
    at_deadline = assembler.add(scope, "other", [ping(last + GAP + GRACE, "other")])
    assert at_deadline.closed == [] and at_deadline.late == []
    past = assembler.add(scope, "other", [ping(last + GAP + GRACE + 1, "other")])
    (session,) = past.closed
    assert (session.vehicle_id, session.reason) == ("v1", "gap")
    assert stamps(session) == [T0, last]
    assert past.late == []


def test_advance_closes_only_past_the_deadline_and_never_moves_time_back() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0), ping(T0, "b"), ping(T0 + 100 * S, "b")])
    assert assembler.advance(scope, T0 + GAP + GRACE).closed == []
    (first,) = assembler.advance(scope, T0 + GAP + GRACE + 1).closed
    assert (first.vehicle_id, stamps(first)) == ("v1", [T0])
    assert assembler.advance(scope, 0).closed == []  # an old clock: event time stays
    (second,) = assembler.advance(scope, T0 + 100 * S + GAP + GRACE + 1).closed
    assert (second.vehicle_id, stamps(second)) == ("b", [T0, T0 + 100 * S])
    assert assembler.close_all(scope).closed == []


def test_a_vehicle_that_keeps_driving_is_not_closed_by_its_first_deadline() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    drive = [ping(T0 + i * 100 * S) for i in range(20)]  # 1900 s, one ping per 100 s
    closed, late = feed(assembler, scope, drive)
    assert closed == [] and late == []
    assert assembler.advance(scope, T0 + 1900 * S + GAP + GRACE).closed == []
    (session,) = assembler.advance(scope, T0 + 1900 * S + GAP + GRACE + 1).closed
    assert len(session.pings) == 20


def test_sessions_close_in_the_order_of_their_deadlines() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0 + 30 * S, "c"), ping(T0, "a"), ping(T0 + 10 * S, "b")])
    closed = assembler.advance(scope, T0 + 10 * S + GAP + GRACE + 1).closed
    assert [s.vehicle_id for s in closed] == ["a", "b"]
    (c,) = assembler.advance(scope, T0 + 30 * S + GAP + GRACE + 1).closed
    assert c.vehicle_id == "c"


# -- late pings ----------------------------------------------------------------------------


def test_pings_behind_a_closed_trip_are_late_and_not_stored() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0), ping(T0 + 10 * S)])
    assembler.advance(scope, T0 + 10 * S + GAP + GRACE + 1)
    keys = scope.stored_keys()
    behind = [ping(T0 + 5 * S), ping(T0 + 10 * S + GAP)]  # inside; exactly one gap after
    out = assembler.add(scope, "v1", behind)
    assert out.late == behind and out.closed == []
    assert scope.stored_keys() == keys
    # One more microsecond would not have joined the closed trip: a new session.
    fresh = assembler.add(scope, "v1", [ping(T0 + 10 * S + GAP + 1)])
    assert fresh.late == []
    (session,) = assembler.close_all(scope).closed
    assert stamps(session) == [T0 + 10 * S + GAP + 1]


def test_pings_more_than_gap_plus_grace_behind_the_watermark_are_late() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    watermark = T0 + 3600 * S
    assembler.add(scope, "lead", [ping(watermark, "lead")])
    keys = scope.stored_keys()
    too_late = ping(watermark - GAP - GRACE - 1, "slow")
    out = assembler.add(scope, "slow", [too_late])
    assert out.late == [too_late]
    assert stored_pings(scope, "slow") == 0
    just_in = ping(watermark - GAP - GRACE, "slow")
    assert assembler.add(scope, "slow", [just_in]).late == []
    assert scope.stored_keys() == keys + 1  # the slow vehicle's meta, holding its ping
    assert stored_pings(scope, "slow") == 1
    sessions = {s.vehicle_id: stamps(s) for s in assembler.close_all(scope).closed}
    assert sessions == {"lead": [watermark], "slow": [watermark - GAP - GRACE]}


def test_a_batch_splits_into_late_and_fresh_pings() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0)])
    assembler.advance(scope, T0 + GAP + GRACE + 1)
    batch = [ping(T0 + 2 * S), ping(T0 + GAP + 5 * S), ping(T0 + S), ping(T0 + GAP + 6 * S)]
    out = assembler.add(scope, "v1", batch)
    assert out.late == [batch[0], batch[2]]
    (session,) = assembler.close_all(scope).closed
    assert stamps(session) == [T0 + GAP + 5 * S, T0 + GAP + 6 * S]


# -- trip ids and forced closing -----------------------------------------------------------


def test_a_new_trip_id_ends_the_previous_trip_which_closes_at_last_plus_grace() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    first = [ping(T0, trip="t1"), ping(T0 + 10 * S, trip="t1")]
    closed, _ = feed(assembler, scope, [*first, ping(T0 + 20 * S, trip="t2")])
    assert closed == []
    assert assembler.advance(scope, T0 + 10 * S + GRACE).closed == []
    (ended,) = assembler.advance(scope, T0 + 10 * S + GRACE + 1).closed
    assert (ended.reason, ended.pings) == ("trip_id", first)
    # The second trip still follows the gap rule, and an ended trip leaves no gap behind.
    assert assembler.advance(scope, T0 + 20 * S + GAP + GRACE).closed == []
    (second,) = assembler.advance(scope, T0 + 20 * S + GAP + GRACE + 1).closed
    assert (second.reason, stamps(second)) == ("gap", [T0 + 20 * S])


def test_pings_of_another_trip_id_within_the_gap_start_their_own_session() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(
        assembler,
        scope,
        [ping(T0, trip="t1"), ping(T0 + S, trip="t2"), ping(T0 + 2 * S, trip="t2")],
    )
    sessions = assembler.close_all(scope).closed
    assert sorted((s.pings[0].get("trip_id"), len(s.pings)) for s in sessions) == [
        ("t1", 1),
        ("t2", 2),
    ]


def test_max_trip_pings_force_closes_and_the_next_ping_starts_a_new_session() -> None:
    assembler, scope = TripAssembler(SessionRules(GAP, GRACE, max_trip_pings=5)), MemoryScope()
    closed, late = feed(assembler, scope, [ping(T0 + i * S) for i in range(4)])
    assert closed == [] and late == []
    (full,) = assembler.add(scope, "v1", [ping(T0 + 4 * S)]).closed
    assert (full.reason, stamps(full)) == ("max_pings", [T0 + i * S for i in range(5)])
    assert stored_pings(scope, "v1") == 0
    nxt = assembler.add(scope, "v1", [ping(T0 + 5 * S)])
    assert nxt.late == [] and nxt.closed == []
    (rest,) = assembler.close_all(scope).closed
    assert (rest.reason, stamps(rest)) == ("end", [T0 + 5 * S])


def test_a_given_trip_id_that_pauses_longer_than_the_gap_continues_as_part_two() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    later = T0 + 10 * S + GAP + 1
    feed(assembler, scope, [ping(T0, trip="7"), ping(T0 + 10 * S, trip="7"), ping(later, trip="7")])
    first, second = assembler.close_all(scope).closed
    assert (first.trip_id, stamps(first)) == ("7", [T0, T0 + 10 * S])
    assert (second.trip_id, stamps(second)) == ("7~2", [later])
    # The part's pings carry its name: prepare_trips keeps it as a given id.
    assert [p["trip_id"] for p in first.pings + second.pings] == ["7", "7", "7~2"]


def test_trips_without_a_given_id_are_named_by_vehicle_and_start() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0 + 1234), ping(T0 + 10 * S)])
    (session,) = assembler.close_all(scope).closed
    assert session.trip_id == f"v1:{(T0 + 1234) // 1000}"
    assert all("trip_id" not in p for p in session.pings)


def test_forced_parts_are_numbered_across_a_restart() -> None:
    scope = MemoryScope()
    rules = SessionRules(GAP, GRACE, max_trip_pings=3)
    closed, _ = feed(TripAssembler(rules), scope, [ping(T0 + i * S, trip="t") for i in range(4)])
    assert [(s.trip_id, s.reason) for s in closed] == [("t", "max_pings")]
    restarted = TripAssembler(rules)  # the parts closed so far live in the vehicle's state
    closed, _ = feed(restarted, scope, [ping(T0 + i * S, trip="t") for i in range(4, 6)])
    closed += restarted.close_all(scope).closed
    assert [(s.trip_id, stamps(s)) for s in closed] == [
        ("t~2", [T0 + 3 * S, T0 + 4 * S, T0 + 5 * S])
    ]


def test_a_message_past_max_trip_pings_closes_the_first_pings_in_time() -> None:
    assembler, scope = TripAssembler(SessionRules(GAP, GRACE, max_trip_pings=3)), MemoryScope()
    order = [T0 + 4 * S, T0 + 2 * S, T0, T0 + 3 * S, T0 + S]
    out = assembler.add(scope, "v1", [ping(ts) for ts in order])
    (part,) = out.closed
    assert (part.reason, stamps(part)) == ("max_pings", [T0 + 2 * S, T0, T0 + S])
    (rest,) = assembler.close_all(scope).closed
    assert stamps(rest) == [T0 + 4 * S, T0 + 3 * S]


def test_the_vehicle_remembers_the_parts_of_its_last_given_ids_only() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    for i in range(PART_MEMORY + 1):
        feed(assembler, scope, [ping(T0 + i * S, trip=f"id{i}")])
    feed(assembler, scope, [ping(T0 + 100 * S, trip="id1"), ping(T0 + 101 * S, trip="id0")])
    names = [s.trip_id for s in assembler.close_all(scope).closed]
    assert names[-2:] == ["id1~2", "id0"]  # id0 was forgotten: bounded state
    assert len(scope._vehicles["v1"]["parts"]) == PART_MEMORY


def test_a_ping_of_another_trip_id_inside_a_trip_cuts_it_in_two() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0 + i * 20 * S, trip="a") for i in range(3)])
    feed(assembler, scope, [ping(T0 + 30 * S, trip="b")])
    sessions = assembler.close_all(scope).closed
    assert [(s.trip_id, stamps(s)) for s in sessions] == [
        ("a", [T0, T0 + 20 * S]),
        ("b", [T0 + 30 * S]),
        ("a~2", [T0 + 40 * S]),
    ]
    assert scope.stored_keys() == 2  # meta and parts: every chunk was read once


def test_after_an_ended_trip_closes_its_later_pings_before_the_next_trip_are_late() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    feed(assembler, scope, [ping(T0, trip="t1"), ping(T0 + 20 * S, trip="t2")])
    (ended,) = assembler.advance(scope, T0 + GRACE + 1).closed
    assert ended.reason == "trip_id"
    # Batch would have put it into t1: it can only be late now, not a new trip t1~2.
    out = assembler.add(scope, "v1", [ping(T0 + 10 * S, trip="t1")])
    assert len(out.late) == 1


# -- what a closed session holds, and the state it leaves ----------------------------------


def test_a_closed_session_returns_its_pings_in_arrival_order_and_deletes_its_chunks() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    messages = [
        [ping(T0 + 30 * S, lat=1.0), ping(T0 + 10 * S, lat=2.0)],
        [ping(T0 + 20 * S, lat=3.0)],
        [ping(T0, lat=4.0), ping(T0 + 40 * S, lat=5.0), ping(T0 + 35 * S, lat=6.0)],
    ]
    for m in messages:
        assembler.add(scope, "v1", m)
        assembler.add(scope, "w", [ping(T0 + 41 * S, "w")])
    assert stored_pings(scope, "v1") == 6
    (session, _w) = assembler.advance(scope, T0 + 41 * S + GAP + GRACE + 1).closed
    assert session.vehicle_id == "v1"
    assert [p["lat"] for p in session.pings] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert scope.stored_keys() == 2  # one meta record per vehicle, nothing else


def test_state_stays_bounded_over_many_trips() -> None:
    assembler, scope = TripAssembler(RULES), MemoryScope()
    closed: list[ClosedSession] = []
    for trip in range(50):
        start = T0 + trip * 3600 * S
        for vehicle in ("a", "b", "c"):
            c, late = feed(assembler, scope, [ping(start + i * 60 * S, vehicle) for i in range(5)])
            assert late == []
            closed.extend(c)
        assert scope.stored_keys() <= 3 + 3 * 5
    closed.extend(assembler.close_all(scope).closed)
    assert len(closed) == 150
    assert all(len(s.pings) == 5 for s in closed)
    assert scope.stored_keys() == 3


def test_close_all_closes_every_session_of_every_vehicle() -> None:
    # A grace of one gap: the ended trip "x" is not due yet when close_all comes.
    assembler, scope = TripAssembler(SessionRules(GAP, GAP)), MemoryScope()
    closed, late = feed(
        assembler,
        scope,
        [
            ping(T0, "a"),
            ping(T0 + GAP + 1, "a"),
            ping(T0 + 5 * S, "b", trip="x"),
            ping(T0 + 6 * S, "b", trip="y"),
            ping(T0 + 7 * S, "c"),
        ],
    )
    assert closed == [] and late == []
    out = assembler.close_all(scope)
    assert [(s.vehicle_id, stamps(s)) for s in out.closed] == [
        ("a", [T0]),
        ("b", [T0 + 5 * S]),
        ("b", [T0 + 6 * S]),
        ("c", [T0 + 7 * S]),
        ("a", [T0 + GAP + 1]),
    ]
    assert {s.reason for s in out.closed} == {"end"}
    # One meta record per vehicle, and b's memory of the parts of its given trip ids.
    assert scope.stored_keys() == 4
    assert assembler.close_all(scope).closed == []
    assert assembler.advance(scope, T0 + 100 * GAP).closed == []


# -- restarts ------------------------------------------------------------------------------


def test_a_restarted_assembler_still_closes_the_open_sessions() -> None:
    scope = MemoryScope()
    before = TripAssembler(RULES)
    feed(before, scope, [ping(T0, "a"), ping(T0 + 10 * S, "b"), ping(T0 + 20 * S, "a")])
    after = TripAssembler(RULES)  # same state, no in-memory timers
    closed, _ = feed(after, scope, [ping(T0 + 10 * S + GAP + GRACE + 1, "c")])
    assert [(s.vehicle_id, stamps(s)) for s in closed] == [("b", [T0 + 10 * S])]
    (a,) = TripAssembler(RULES).advance(scope, T0 + 20 * S + GAP + GRACE + 1).closed
    assert (a.vehicle_id, stamps(a)) == ("a", [T0, T0 + 20 * S])


def test_an_assembler_sees_what_another_instance_did_since() -> None:
    # A partition that moved away and back (hand_over, as a Kafka rebalance): the
    # persisted version tells the first instance its in-memory timers are stale.
    scope = MemoryScope()
    one, two = TripAssembler(RULES), TripAssembler(RULES)
    one.add(scope, "a", [ping(T0, "a")])
    one.add(scope, "b", [ping(T0 + 100 * S, "b")])
    scope.hand_over()
    out = two.add(scope, "c", [ping(T0 + GAP + GRACE + 1, "c")])
    assert [s.vehicle_id for s in out.closed] == ["a"]
    scope.hand_over()
    # The other instance's event time counts: this ping is too far behind it.
    assert len(one.add(scope, "e", [ping(T0, "e")]).late) == 1
    # a is not closed twice; b, and c (opened by the other instance), close on time.
    assert one.advance(scope, T0 + 100 * S + GAP + GRACE).closed == []
    closed = one.advance(scope, T0 + 100 * S + GAP + GRACE + 1).closed
    assert [s.vehicle_id for s in closed] == ["b"]
    closed = one.advance(scope, T0 + 2 * (GAP + GRACE) + 2).closed
    assert [s.vehicle_id for s in closed] == ["c"]
    assert scope.stored_keys() == 4  # metas of a, b, c and e


def test_a_vehicles_record_is_read_again_after_another_instance_wrote_it() -> None:
    # An assembler keeps the records it wrote for its next messages, but only until the
    # partition may have been written by someone else (hand_over, as a Kafka rebalance).
    scope = MemoryScope()
    one, two = TripAssembler(RULES), TripAssembler(RULES)
    one.add(scope, "v1", [ping(T0, "v1")])
    scope.hand_over()
    two.add(scope, "v1", [ping(T0 + S, "v1")])
    scope.hand_over()
    one.add(scope, "v1", [ping(T0 + 2 * S, "v1")])
    (session,) = one.close_all(scope).closed
    assert stamps(session) == [T0, T0 + S, T0 + 2 * S]


def test_a_restart_keeps_pending_sessions_for_flush() -> None:
    scope = MemoryScope()
    TripAssembler(RULES, defer=True).add(scope, "a", [ping(T0, "a")])
    restarted = TripAssembler(RULES, defer=True)
    assert restarted.advance(scope, T0 + GAP + GRACE + 1).pending == 1
    again = TripAssembler(RULES, defer=True)
    (session,) = again.flush(scope)
    assert (session.vehicle_id, stamps(session)) == ("a", [T0])


# -- deferred closing ----------------------------------------------------------------------


def test_deferred_closing_keeps_pings_in_state_until_flush_returns_each_session_once() -> None:
    assembler, scope = TripAssembler(RULES, defer=True), MemoryScope()
    feed(assembler, scope, [ping(T0, "a"), ping(T0 + S, "a"), ping(T0 + 2 * S, "b")])
    out = assembler.advance(scope, T0 + S + GAP + GRACE + 1)
    assert out == Assembled(closed=[], late=[], pending=1)
    assert stored_pings(scope, "a") == 2  # still in state
    # The closed trip is closed even before it is collected: its late pings stay out.
    behind = assembler.add(scope, "a", [ping(T0 + 5 * S, "a")])
    assert len(behind.late) == 1 and behind.pending == 1
    out = assembler.advance(scope, T0 + 2 * S + GAP + GRACE + 1)
    assert out.closed == [] and out.pending == 2
    flushed = assembler.flush(scope)
    assert [(s.vehicle_id, stamps(s), s.reason) for s in flushed] == [
        ("a", [T0, T0 + S], "gap"),
        ("b", [T0 + 2 * S], "gap"),
    ]
    assert assembler.flush(scope) == []
    assert scope.stored_keys() == 2
    assert assembler.advance(scope, T0 + 10 * GAP).pending == 0


def test_deferred_pending_sessions_and_new_ones_of_the_same_vehicle_stay_apart() -> None:
    assembler, scope = TripAssembler(RULES, defer=True), MemoryScope()
    feed(assembler, scope, [ping(T0), ping(T0 + S)])
    assembler.advance(scope, T0 + S + GAP + GRACE + 1)
    later = [ping(T0 + S + GAP + GRACE + 2), ping(T0 + S + GAP + GRACE + 3)]
    closed, late = feed(assembler, scope, later)
    assert closed == [] and late == []
    (old,) = assembler.flush(scope)
    assert stamps(old) == [T0, T0 + S]
    assert stored_pings(scope, "v1") == 2  # the open session's pings only
    out = assembler.close_all(scope)
    assert out.closed == [] and out.pending == 1
    (new,) = assembler.flush(scope)
    assert (new.pings, new.reason) == (later, "end")
    assert scope.stored_keys() == 1


def test_deferred_force_close_is_pending_too() -> None:
    assembler = TripAssembler(SessionRules(GAP, GRACE, max_trip_pings=3), defer=True)
    scope = MemoryScope()
    out = assembler.add(scope, "v1", [ping(T0), ping(T0 + S), ping(T0 + 2 * S)])
    assert out.closed == [] and out.pending == 1
    (session,) = assembler.flush(scope)
    assert (session.reason, len(session.pings)) == ("max_pings", 3)


# -- scale and the batch rule --------------------------------------------------------------


def test_work_is_linear_one_chunk_per_tail_of_pings_and_one_session() -> None:
    n = 20_000
    assembler, scope = TripAssembler(RULES), MemoryScope()
    for i in range(n):
        out = assembler.add(scope, "v1", [ping(T0 + i * S)])
        assert not out.closed and not out.late
    assert stored_pings(scope, "v1") == n
    # The meta record (with the latest pings) and one chunk per TAIL_PINGS pings before them.
    assert scope.stored_keys() == n // TAIL_PINGS + 1
    (session,) = assembler.close_all(scope).closed
    assert len(session.pings) == n
    assert stamps(session) == [T0 + i * S for i in range(n)]
    assert scope.stored_keys() == 1


# A trip as both paths name it: (vehicle, trip id, its pings' timestamps in order).
Trip = tuple[str, str, tuple[int, ...]]


def dirty_pings(rng: random.Random, max_trip_pings: int) -> list[dict[str, Any]]:
    """Pings of a few vehicles in time order, each with a unique ``seq``.

    Vehicles without trip ids, with per-vehicle counters 1, 2, 3 (the same ids on every
    vehicle), with a few ids that come back, and with two ids taking turns; pauses
    shorter than, exactly, just over and far beyond the gap inside one trip id; exact
    duplicates; trips longer than ``max_trip_pings``. No two pings of one vehicle share a
    ``ts`` with different trip ids (cleaning keeps only the first ping of a vehicle and
    ``ts``, so which one a path keeps is no rule of trip cutting).
    """
    pings: list[dict[str, Any]] = []
    for vehicle in (f"v{i}" for i in range(rng.randint(1, 4))):
        style = rng.choice(["none", "counter", "recurring", "mixed", "interleaved"])
        ts = T0 + rng.randint(0, 1800) * S
        for segment in range(rng.randint(1, 5)):
            trip = {
                "none": None,
                "counter": str(segment + 1),
                "recurring": rng.choice(["a", "b"]),
                "mixed": rng.choice([None, "x", str(segment + 1)]),
                "interleaved": None,
            }[style]
            for _ in range(rng.randint(1, 3 * max_trip_pings)):
                if style == "interleaved":  # two trip ids taking turns
                    trip = rng.choice(["p", "q"])
                p = ping(ts, vehicle, trip)
                p["seq"] = len(pings)
                pings.append(p)
                if rng.random() < 0.08:  # the device sent it twice
                    pings.append({**p, "seq": len(pings)})
                ts += rng.choice(
                    [
                        rng.randint(1, 999),  # within the millisecond: names by start ms
                        rng.randint(1, 20 * S),
                        rng.randint(1, 20 * S),
                        rng.randint(1, 60 * S),
                        rng.randint(1, GAP),
                        GAP,
                        GAP + 1,
                        rng.randint(GAP + 1, 4 * GAP),
                    ]
                )
    return pings


def arrivals(
    rng: random.Random, pings: list[dict[str, Any]], grace: int
) -> list[tuple[int, list[dict[str, Any]]]]:
    """The pings as messages ``(arrival, pings)``: delayed by up to the grace (out of
    order), a few far beyond it (late), some consecutive ones of a vehicle batched."""
    keyed = []
    for p in pings:
        delay = rng.randint(0, grace) if rng.random() < 0.5 else 0
        if rng.random() < 0.03:
            delay = rng.randint(GAP + grace + 1, 3 * GAP)
        keyed.append((int(p["ts"]) + delay, rng.random(), p))
    keyed.sort(key=lambda k: (k[0], k[1]))
    messages: list[tuple[int, list[dict[str, Any]]]] = []
    for arrival, _, p in keyed:
        last = messages[-1][1] if messages else None
        same_vehicle = last and last[0]["vehicle_id"] == p["vehicle_id"] and len(last) < 5
        if last and same_vehicle and rng.random() < 0.3:
            last.append(p)
            continue
        messages.append((arrival, [p]))
    return messages


def batch_trips(pings: list[dict[str, Any]], rules: SessionRules) -> list[Trip]:
    """The real batch cut (``assign_trips``) of ``pings``, short trips included."""
    frame = pl.DataFrame(
        {
            "ts": [int(p["ts"]) for p in pings],
            "vehicle_id": [p["vehicle_id"] for p in pings],
            "trip_id": [p.get("trip_id") for p in pings],
            "lat": [p["lat"] for p in pings],
            "lon": [p["lon"] for p in pings],
        },
        schema_overrides={"trip_id": pl.String},
    ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
    config = TripConfig(
        gap_s=rules.gap_us / S,
        min_duration_s=0,
        min_distance_km=0,
        min_pings=2,
        max_trip_pings=rules.max_trip_pings,
    )
    result = assign_trips(frame, config)
    cut = pl.concat([result.pings, result.quarantine.select(result.pings.columns)])
    trips = cut.group_by("vehicle_id", "trip_id").agg(pl.col("ts").dt.epoch("us").sort())
    return sorted((v, t, tuple(stamps_)) for v, t, stamps_ in trips.iter_rows())


@pytest.mark.parametrize("seed", range(100))
def test_the_assembler_cuts_and_names_trips_as_batch_does(seed: int) -> None:
    """The stream's trips are batch's trips, on random dirty streams.

    Compared: the trips (vehicle, trip id, sorted ``ts`` of their pings) that the real
    ``TripAssembler`` closes when fed message by message (with clock messages, deferred
    or not), against the trips the real ``assign_trips`` cuts from every ping the
    assembler did not return as late, fed in arrival order. Both see the raw pings,
    duplicates included: cleaning, which drops the later copy of a (vehicle, ts), runs
    before the cut in batch and on each closed trip in the stream, where an exact copy
    always lands in its original's trip. No trip id is closed twice for one vehicle.
    """
    rng = random.Random(seed)
    max_trip_pings = rng.choice([3, 5, 8, 50_000])
    rules = SessionRules.of(300, rng.choice([0.0, 30.0, 120.0]), max_trip_pings)
    pings = dirty_pings(rng, min(max_trip_pings, 8))
    assembler = TripAssembler(rules, defer=rng.random() < 0.5)
    scope = MemoryScope()
    closed: list[ClosedSession] = []
    late: set[int] = set()
    sent: list[dict[str, Any]] = []
    for arrival, message in arrivals(rng, pings, rules.grace_us):
        sent.extend(message)
        out = assembler.add(scope, message[0]["vehicle_id"], message)
        if rng.random() < 0.1:
            out.closed.extend(assembler.advance(scope, arrival).closed)
        closed.extend(out.closed)
        late.update(p["seq"] for p in out.late)
        if rng.random() < 0.3:
            closed.extend(assembler.flush(scope))
    closed.extend(assembler.close_all(scope).closed)
    closed.extend(assembler.flush(scope))

    streamed = sorted((s.vehicle_id, s.trip_id, tuple(sorted(stamps(s)))) for s in closed)
    assert len({(v, t) for v, t, _ in streamed}) == len(streamed)  # no id twice
    assert streamed == batch_trips([p for p in sent if p["seq"] not in late], rules)
    given = [s for s in closed if s.pings[0].get("trip_id") is not None]
    assert all(p["trip_id"] == s.trip_id for s in given for p in s.pings)
    assert scope.stored_keys() <= 2 * len({p["vehicle_id"] for p in pings})


def test_a_merging_batch_keeps_its_pings_in_arrival_order() -> None:
    assembler, scope = TripAssembler(SessionRules.of(300, 30)), MemoryScope()
    assembler.add(scope, "v1", [ping(T0, "v1")])  # session A
    assembler.add(scope, "v1", [ping(T0 + 320 * S, "v1")])  # session B, 320 s later: apart
    # One message: a ping of B, a ping of A, then one bridging both.
    batch = [ping(T0 + 315 * S, "v1"), ping(T0 + 5 * S, "v1"), ping(T0 + 160 * S, "v1")]
    assembler.add(scope, "v1", batch)
    (session,) = assembler.close_all(scope).closed
    arrival = [T0, T0 + 320 * S, T0 + 315 * S, T0 + 5 * S, T0 + 160 * S]
    assert [p["ts"] for p in session.pings] == arrival
