"""The dashboard's HTML: every page server-rendered, every value escaped.

Charts are Plotly figures written as JSON into ``<script type="application/json">``
blocks, which ``static/dashboard.js`` draws with the plotly.js the app serves: the pages
run no inline script, so the Content-Security-Policy allows scripts from the app only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any, Final
from urllib.parse import quote, urlencode

import polars as pl

from driverscore.domain.audit import AliasMove
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import BAND_FLOORS
from driverscore.services.dashboard.sources import (
    GATE_METRICS,
    EntityPage,
    ModelPage,
    Overview,
    Period,
)

__all__ = [
    "alert_row",
    "alerts_page",
    "entity_html",
    "error_page",
    "login_page",
    "model_html",
    "overview_html",
]

_BAND_COLOURS: Final = {
    "low": "#2e7d32",
    "moderate": "#9e9d24",
    "elevated": "#ef6c00",
    "high": "#c62828",
}
_NAV: Final = (("", "Fleet overview"), ("alerts", "High-risk alerts"), ("model", "Model"))


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.3g}"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M}"
    if isinstance(value, list | tuple):
        return "; ".join(str(v) for v in value) or "—"
    return str(value)


def _band(band: object) -> str:
    text = escape(str(band)) if band is not None else "—"
    return f'<span class="band band-{text}">{text}</span>'


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, css: str = "", empty: str = ""
) -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">{escape(empty or "none")}</td></tr>'
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def chart(chart_id: str, figure: dict[str, Any], *, height: int = 320) -> str:
    """A div that ``dashboard.js`` fills with ``figure`` (Plotly ``data`` and ``layout``)."""
    layout = {"margin": {"t": 36, "r": 16, "b": 40, "l": 48}, "height": height}
    layout.update(figure.get("layout", {}))
    spec = json.dumps({"data": figure["data"], "layout": layout}, default=_json_default)
    # ``</`` cannot end the JSON block early: the escape keeps it valid JSON.
    spec = spec.replace("</", "<\\/")
    return (
        f'<div class="chart" id="{chart_id}" data-chart="{chart_id}-spec"></div>'
        f'<script type="application/json" id="{chart_id}-spec">{spec}</script>'
    )


def layout(title: str, body: str, *, base: str, active: str = "", engine: str = "") -> str:
    links = "".join(
        f'<a href="{base}/{path}" class="{"active" if path == active else ""}">{label}</a>'
        for path, label in _NAV
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · driverscore</title>"
        f'<link rel="icon" href="data:,"><link rel="stylesheet" href="{base}/static/dashboard.css">'
        f'<script src="{base}/static/plotly.min.js" defer></script>'
        f'<script src="{base}/static/dashboard.js" defer></script></head>'
        f'<body data-base="{base}"><header><span class="brand">driverscore</span>'
        f"<nav>{links}</nav></header><main><h1>{escape(title)}</h1>{body}</main>"
        f"<footer>score store: {escape(engine)}</footer></body></html>"
    )


def error_page(status: int, message: str, *, base: str) -> str:
    return layout(
        f"{status}",
        f'<p class="error">{escape(message)}</p><p><a href="{base}/">fleet overview</a></p>',
        base=base,
    )


def login_page(*, base: str, failed: bool, next_path: str) -> str:
    note = '<p class="error">that token is not accepted</p>' if failed else ""
    return layout(
        "Sign in",
        f'{note}<form method=post action="{base}/login" class=login>'
        f'<input type=hidden name=next value="{escape(next_path)}">'
        "<label>API token <input type=password name=token autocomplete=off required autofocus>"
        "</label><button type=submit>Sign in</button></form>"
        "<p>The dashboard accepts the scoring service's bearer tokens.</p>",
        base=base,
    )


def _link(base: str, entity: str, entity_id: object, label: object = None, **query: str) -> str:
    if entity_id is None:
        return "—"
    href = f"{base}/{entity}s/{quote(str(entity_id), safe='')}"
    if query:
        href += "?" + urlencode(query)
    return f'<a href="{escape(href)}">{escape(str(entity_id if label is None else label))}</a>'


def _filters(period: Period, base: str) -> str:
    def field(name: str, label: str, value: str, kind: str = "text") -> str:
        return (
            f'<label>{label} <input type={kind} name={name} value="{escape(value)}" '
            f'step="any"></label>'
        )

    return (
        f'<form method=get action="{base}/" class=filters>'
        + field("days", "days", f"{period.days:g}", "number")
        + field("end", "ending", f"{period.end:%Y-%m-%dT%H:%M}")
        + field("fleet", "fleet", period.fleet or "")
        + field("client", "client", period.client or "")
        + "<button type=submit>Apply</button></form>"
        f'<p class="period">trips ending {period.start:%Y-%m-%d %H:%M} → '
        f"{period.end:%Y-%m-%d %H:%M} UTC</p>"
    )


def _histogram(frame: pl.DataFrame, title: str) -> dict[str, Any]:
    data = [
        {
            "type": "bar",
            "name": str(group),
            "x": part["bucket"].to_list(),
            "y": part["trip_count"].to_list(),
        }
        for (group,), part in frame.group_by(["group_id"], maintain_order=True)
    ]
    return {
        "data": data,
        "layout": {
            "title": {"text": title},
            "barmode": "group",
            "xaxis": {"title": {"text": "score (bucket start)"}, "dtick": 10},
            "yaxis": {"title": {"text": "trips"}},
        },
    }


def overview_html(view: Overview, *, base: str, engine: str) -> str:
    period = view.period
    order = {name: i for i, (name, _floor) in enumerate(BAND_FLOORS)}
    band_rows = view.bands.sort(pl.col("risk_band").replace_strict(order, default=len(order)))
    bands = {
        "data": [
            {
                "type": "bar",
                "x": band_rows["risk_band"].to_list(),
                "y": [round(100 * s, 2) for s in band_rows["share"].to_list()],
                "marker": {"color": [_BAND_COLOURS.get(b, "#888") for b in band_rows["risk_band"]]},
            }
        ],
        "layout": {"title": {"text": "band shares (% of trips)"}},
    }
    trend = {
        "data": [
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": "score (km-weighted)",
                "x": view.trend["day"].to_list(),
                "y": view.trend["score"].to_list(),
            },
            {
                "type": "bar",
                "name": "high-risk trips",
                "x": view.trend["day"].to_list(),
                "y": view.trend["high_risk_trips"].to_list(),
                "yaxis": "y2",
                "opacity": 0.4,
            },
        ],
        "layout": {
            "title": {"text": "trend per day"},
            "yaxis": {"title": {"text": "score"}, "range": [0, 100]},
            "yaxis2": {"overlaying": "y", "side": "right", "title": {"text": "trips"}},
            "legend": {"orientation": "h"},
        },
    }
    worst = table(
        ["driver", "score", "band", "trips", "km"],
        (
            (
                _link(base, "driver", r["driver_id"]),
                _cell(r["score"]),
                _band(r["risk_band"]),
                _cell(r["trip_count"]),
                _cell(r["distance_km"]),
            )
            for r in view.worst_drivers.iter_rows(named=True)
        ),
        empty="no trips in the period",
    )

    def groups(frame: pl.DataFrame, name: str) -> str:
        return table(
            [name, "score", "band", "trips", "km"],
            (
                (
                    escape(_cell(r["group_id"])),
                    _cell(r["score"]),
                    _band(r["risk_band"]),
                    _cell(r["trip_count"]),
                    _cell(r["distance_km"]),
                )
                for r in frame.iter_rows(named=True)
            ),
            empty="no trips in the period",
        )

    total = int(view.bands["trip_count"].sum()) if view.bands.height else 0
    body = (
        _filters(period, base)
        + f'<p class="summary"><b>{total:,}</b> trips</p>'
        + '<div class="grid">'
        + chart("trend", trend)
        + chart("bands", bands)
        + chart("fleet-histogram", _histogram(view.fleet_histogram, "score distribution per fleet"))
        + chart(
            "client-histogram", _histogram(view.client_histogram, "score distribution per client")
        )
        + "</div><div class=grid><section><h2>Worst drivers</h2>"
        + worst
        + "</section><section><h2>Fleets</h2>"
        + groups(view.fleets, "fleet")
        + "<h2>Clients</h2>"
        + groups(view.clients, "client")
        + "</section></div>"
    )
    return layout("Fleet overview", body, base=base, active="", engine=engine)


def alert_row(row: dict[str, Any], *, base: str) -> str:
    """One alert as a table row (also what the live feed sends)."""
    key = f"{row['vehicle_id']}/{row['trip_id']}/{row['model_version']}"
    end = row["end_ts"]
    return (
        f'<tr data-key="{escape(key)}" data-end="{escape(_cell(end))}">'
        f"<td>{escape(_cell(end))}</td>"
        f"<td>{_link(base, 'driver', row['driver_id'])}</td>"
        f"<td>{_link(base, 'vehicle', row['vehicle_id'], trip=str(row['trip_id']))}</td>"
        f"<td>{escape(_cell(row['fleet_id']))}</td>"
        f"<td>{_cell(row['score'])}</td><td>{_band(row['risk_band'])}</td>"
        f'<td class="reasons">{escape(_cell(row["reasons"]))}</td></tr>'
    )


def alerts_page(alerts: pl.DataFrame, *, base: str, engine: str) -> str:
    rows = "".join(alert_row(r, base=base) for r in alerts.iter_rows(named=True))
    body = (
        "<p>Trips whose risk reached the model's alert threshold, newest trip end first. "
        '<span id="feed-status" class="feed">live feed: connecting…</span></p>'
        '<table id="alerts" class="alerts"><thead><tr><th>trip end (UTC)</th><th>driver</th>'
        "<th>vehicle (trip)</th><th>fleet</th><th>score</th><th>band</th><th>reasons</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )
    return layout("High-risk alerts", body, base=base, active="alerts", engine=engine)


#: The route chart's legend: each event flag of a route point (``domain/routes.py``; the
#: definitions are the trip features'), its name, colour, marker size and legend place.
#: Drawn in this order: instant events over speeding, which colours stretches.
_ROUTE_EVENTS: Final = (
    ("speeding", "speeding", "#ef6c00", 8, 5),
    ("harsh_corner", "harsh cornering", "#1565c0", 12, 4),
    ("harsh_accel", "harsh acceleration", "#6a1b9a", 12, 3),
    ("hard_brake", "hard brake", "#c62828", 12, 2),
)


def _route_figure(route: pl.DataFrame) -> dict[str, Any]:
    """The route on plain lon/lat axes (no map tiles): the line through its points in
    time order, and the points coloured by event with a legend (a point with several
    events is in each of their series); hovering a point gives its time, the speed driven
    to reach it and its events."""
    route = route.sort("ts")
    ts = route["ts"].to_list()
    lat, lon = route["lat"].to_list(), route["lon"].to_list()
    flags = {
        column: route[column].fill_null(value=False).to_list()
        if column in route.columns
        else [False] * route.height
        for column, *_ in _ROUTE_EVENTS
    }
    speeds: list[float] = [0.0]
    for i in range(1, len(ts)):
        seconds = max((ts[i] - ts[i - 1]).total_seconds(), 1e-3)
        metres = _metres(lat[i - 1], lon[i - 1], lat[i], lon[i])
        speeds.append(metres / seconds * 3.6)
    events = [
        ", ".join(name for column, name, *_ in reversed(_ROUTE_EVENTS) if flags[column][i])
        or "no event"
        for i in range(len(ts))
    ]
    text = [
        f"{t:%H:%M:%S} · {v:.0f} km/h · {e}" for t, v, e in zip(ts, speeds, events, strict=True)
    ]

    def points(name: str, rows: list[int], colour: str, size: int, rank: int) -> dict[str, Any]:
        # Plotly leaves a series without points out of the legend: an empty series gets one
        # point without position, so the legend always lists every event.
        return {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "legendrank": rank,
            "x": [lon[i] for i in rows] or [None],
            "y": [lat[i] for i in rows] or [None],
            "text": [text[i] for i in rows] or [""],
            "hoverinfo": "text",
            "marker": {"color": colour, "size": size},
        }

    quiet = [i for i, e in enumerate(events) if e == "no event"]
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines",
                "name": "route (time order)",
                "x": lon,
                "y": lat,
                "line": {"color": "#bbb", "width": 2},
                "hoverinfo": "skip",
                "showlegend": False,
            },
            points("no event", quiet, "#9e9e9e", 5, 1),
            *(
                points(name, [i for i, hit in enumerate(flags[column]) if hit], colour, size, rank)
                for column, name, colour, size, rank in _ROUTE_EVENTS
            ),
        ],
        "layout": {
            "title": {"text": "route (lon / lat, points coloured by event)"},
            "xaxis": {"title": {"text": "longitude"}},
            "yaxis": {"title": {"text": "latitude"}, "scaleanchor": "x"},
            "legend": {"orientation": "h", "y": -0.15},
        },
    }


def _metres(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    from math import asin, cos, radians, sin, sqrt

    dlat, dlon = radians(lat2 - lat1), radians(lon2 - lon1)
    h = sin(dlat / 2) ** 2 + cos(radians(lat1)) * cos(radians(lat2)) * sin(dlon / 2) ** 2
    return 2 * 6_371_000.0 * asin(min(1.0, sqrt(h)))


_BEHAVIOUR_LABELS: Final = (
    ("hard_brake_count", "hard brakes"),
    ("harsh_accel_count", "harsh accel."),
    ("harsh_corner_count", "harsh corners"),
    ("speeding_share", "speeding share"),
    ("night_share", "night share"),
    ("max_speed_kmh", "max km/h"),
)


def entity_html(page: EntityPage, *, base: str, engine: str) -> str:
    other = "vehicle" if page.entity == "driver" else "driver"
    other_column = f"{other}_id"
    rows = []
    for r in page.trips.iter_rows(named=True):
        selected = r["trip_id"] == page.trip_id and r["vehicle_id"] == page.vehicle_id
        trip = _link(base, page.entity, page.entity_id, r["trip_id"], trip=str(r["trip_id"]))
        rows.append(
            (
                trip + (" ◀" if selected else ""),
                escape(_cell(r["end_ts"])),
                _link(base, other, r[other_column]),
                _cell(r["distance_km"]),
                _cell(r["score"]),
                _band(r["risk_band"]),
                *(escape(_cell(r.get(c))) for c, _ in _BEHAVIOUR_LABELS),
                f'<span class="reasons">{escape(_cell(r["reasons"]))}</span>',
            )
        )
    history = table(
        ["trip", "end (UTC)", other, "km", "score", "band"]
        + [label for _, label in _BEHAVIOUR_LABELS]
        + ["reasons"],
        rows,
    )
    ordered = page.trips.sort("end_ts")
    scores = {
        "data": [
            {
                "type": "scatter",
                "mode": "markers+lines",
                "x": ordered["end_ts"].to_list(),
                "y": ordered["score"].to_list(),
                "text": ordered["trip_id"].to_list(),
                "marker": {
                    "color": [_BAND_COLOURS.get(b or "", "#888") for b in ordered["risk_band"]]
                },
            }
        ],
        "layout": {
            "title": {"text": "score per trip"},
            "yaxis": {"range": [0, 100], "title": {"text": "score"}},
            "shapes": [
                {
                    "type": "line",
                    "xref": "paper",
                    "x0": 0,
                    "x1": 1,
                    "y0": floor,
                    "y1": floor,
                    "line": {"dash": "dot", "width": 1, "color": _BAND_COLOURS.get(name, "#888")},
                }
                for name, floor in BAND_FLOORS
                if floor > 0
            ],
        },
    }
    if page.route is not None and page.route.height:
        route = chart("route", _route_figure(page.route), height=480)
    else:
        route = '<p class="empty">no route stored for this trip</p>'
    body = (
        f'<div class="grid">{chart("scores", scores)}<section><h2>Trip '
        f"{escape(str(page.trip_id))} (vehicle {escape(str(page.vehicle_id))})</h2>{route}"
        f"</section></div><h2>Trips ({page.trips.height:,}, newest first)</h2>{history}"
    )
    title = f"{page.entity.title()} {page.entity_id}"
    return layout(title, body, base=base, engine=engine)


def model_html(page: ModelPage, *, base: str, engine: str) -> str:
    parts: list[str] = []
    if page.registry_error:
        parts.append(f'<p class="error">{escape(page.registry_error)}</p>')
    by_alias = {a: v.version for v in page.versions for a in v.aliases}
    aliases = table(
        ["champion", "challenger", "previous"],
        [[escape(by_alias.get(a, "—")) for a in ("champion", "challenger", "previous")]],
    )
    split = f"<p>rollout policy (registry): {_policy(page.rollout)}</p>"
    if page.service_rollout is not None:
        split += f"<p>in force on this service: {_policy(page.service_rollout)}</p>"
    served = table(
        ["model", "version", "role", "trips (30 days)", "mean score"],
        (
            (
                escape(_cell(r["model_name"])),
                escape(_cell(r["model_version"])),
                escape(_cell(r["model_role"])),
                _cell(r["trip_count"]),
                _cell(r["mean_score"]),
            )
            for r in page.served.iter_rows(named=True)
        ),
        empty="no scored trips stored",
    )
    parts.append(f'<div class="grid"><section><h2>Aliases</h2>{aliases}{split}')
    parts.append(f"<h2>Traffic in the score store</h2>{served}</section>")
    parts.append(f"<section><h2>Drift</h2>{_drift(page.drift)}</section></div>")
    ordered = list(reversed(page.versions))
    metrics = {
        "data": [
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": name.removeprefix("holdout."),
                # Versions in registration order, as categories: several may share a minute.
                "x": [f"v{v.version}" for v in ordered],
                "y": [v.metrics.get(name) for v in ordered],
                "text": [f"registered {v.created_at}" for v in ordered],
            }
            for name in GATE_METRICS
        ],
        "layout": {
            "title": {"text": "gate metrics per version, oldest first (holdout)"},
            "xaxis": {"type": "category"},
            "legend": {"orientation": "h"},
        },
    }
    parts.append(chart("gate-metrics", metrics))
    parts.append(
        "<h2>Versions</h2>"
        + table(
            ["version", "aliases", "gate", "registered (UTC)", "code"]
            + [m.removeprefix("holdout.") for m in GATE_METRICS],
            (
                (
                    escape(v.version),
                    escape(", ".join(v.aliases) or "—"),
                    escape(v.gate_status),
                    escape(v.created_at),
                    escape(v.code_version[:12]),
                    *(_cell(v.metrics.get(m)) for m in GATE_METRICS),
                )
                for v in page.versions
            ),
            empty="no registered versions",
        )
    )
    parts.append("<h2>Audit log of alias moves</h2>" + _audit(page.audit))
    return layout("Model", "".join(parts), base=base, active="model", engine=engine)


def _drift(result: dict[str, Any] | None) -> str:
    if result is None:
        return '<p class="empty">no monitoring result yet (driverscore monitor)</p>'
    verdict = str(result.get("verdict", "unknown"))
    window = result.get("window", {})
    drifted = [str(f) for f in result.get("drifted_features", [])]
    return (
        f'<p>latest window: <span class="verdict verdict-{escape(verdict)}">{escape(verdict)}'
        f"</span></p><p>{escape(str(window.get('start', '?')))} → "
        f"{escape(str(window.get('end', '?')))}, model version "
        f"{escape(str(result.get('model', {}).get('version', '?')))}</p>"
        + f"<p>{escape(str(result.get('summary', '')))}</p>"
        + (f"<p>drifted: {escape(', '.join(drifted))}</p>" if drifted else "")
    )


def _policy(policy: RolloutPolicy | None) -> str:
    if policy is None:
        return "—"
    text = f"<b>{escape(policy.mode)}</b>"
    if policy.mode == "canary":
        text += f", {policy.challenger_percent:g}% of drivers answered by the challenger"
    return text


def _audit(moves: list[AliasMove]) -> str:
    return table(
        ["at (UTC)", "actor", "action", "alias", "from", "to", "reason"],
        (
            (
                escape(_cell(m.at)),
                escape(m.actor),
                escape(m.action),
                escape(m.alias),
                escape(m.from_version or "—"),
                escape(m.to_version or "—"),
                escape(m.reason),
            )
            for m in moves
        ),
        empty="no alias moves recorded",
    )
