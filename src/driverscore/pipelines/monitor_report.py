"""The monitoring result as an HTML page a person reads: one file that opens offline.

Built from the same result object as the JSON (and the two profiles it was judged on), so
what a person reads and what the retraining job acts on cannot disagree. Charts are
plotly figures; plotly.js is inlined once in the page (no CDN, no network).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from driverscore.domain.profiles import ColumnEdges, NumericProfile, TripProfile

__all__ = ["render_report"]

#: Bars per histogram: groups of fine bins of about equal reference mass.
_DISPLAY_BINS: Final = 30
_COLORS: Final = {"ok": "#2e7d32", "warn": "#ef6c00", "drift": "#c62828", "degraded": "#6a1b9a"}


def _display_groups(reference: NumericProfile, edges: ColumnEdges) -> list[tuple[int, int]]:
    """(first, last) fine bins of each bar: the open bins alone, the interior in groups."""
    bins = edges.bins
    if bins < 3:
        return [(0, bins - 1)]
    counts = reference.counts[1:-1].astype(np.float64)
    total = counts.sum()
    groups: list[tuple[int, int]] = [(0, 0)]
    start = 1
    if total > 0:
        cumulative = np.cumsum(counts) / total
        for k in range(1, _DISPLAY_BINS):
            end = int(np.searchsorted(cumulative, k / _DISPLAY_BINS, side="left")) + 1
            if end >= start and end < bins - 1:
                groups.append((start, end))
                start = end + 1
    if start <= bins - 2:
        groups.append((start, bins - 2))
    groups.append((bins - 1, bins - 1))
    return groups


def _label(edges: ColumnEdges, first: int, last: int) -> str:
    e = edges.edges
    if first == 0:
        return f"< {e[0]:.3g}"
    if first == edges.bins - 1:
        return f"> {e[-1]:.3g}"
    return f"{e[first - 1]:.3g}–{e[last]:.3g}"


def _histogram(
    name: str, reference: NumericProfile, current: NumericProfile, edges: ColumnEdges
) -> go.Figure:
    groups = _display_groups(reference, edges)
    labels = [_label(edges, a, b) for a, b in groups]
    figure = go.Figure()
    for title, profile, color in (
        ("reference", reference, "#90a4ae"),
        ("window", current, "#1565c0"),
    ):
        total = max(profile.present, 1)
        shares = [float(profile.counts[a : b + 1].sum()) / total for a, b in groups]
        figure.add_bar(x=labels, y=shares, name=title, marker_color=color)
    figure.update_layout(
        title=name,
        barmode="group",
        height=280,
        margin={"l": 40, "r": 10, "t": 40, "b": 60},
        yaxis={"title": "share of trips", "tickformat": ".0%"},
        legend={"orientation": "h"},
    )
    return figure


def _bands(band_shares: dict[str, dict[str, float]]) -> go.Figure:
    order = ["low", "moderate", "elevated", "high"]
    figure = go.Figure()
    for title, color in (("reference", "#90a4ae"), ("current", "#1565c0")):
        shares = band_shares.get(title, {})
        figure.add_bar(
            x=order, y=[shares.get(b, 0.0) for b in order], name=title, marker_color=color
        )
    figure.update_layout(
        title="risk band shares",
        barmode="group",
        height=280,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        yaxis={"tickformat": ".0%"},
    )
    return figure


def _trend(history: Sequence[dict[str, Any]], result: dict[str, Any]) -> go.Figure:
    points = [*history]
    performance = result.get("performance", {})
    points.append(
        {
            "window_end": str(result["window"]["end"]),
            "estimated_roc_auc": (performance.get("estimated") or {}).get("roc_auc"),
            "realised_roc_auc": (performance.get("realised") or {}).get("roc_auc"),
        }
    )
    figure = go.Figure()
    for key, title in (("estimated_roc_auc", "estimated"), ("realised_roc_auc", "realised")):
        figure.add_scatter(
            x=[str(p.get("window_end")) for p in points],
            y=[p.get(key) for p in points],
            mode="lines+markers",
            name=f"{title} ROC-AUC",
            connectgaps=True,
        )
    figure.update_layout(
        title="performance over time",
        height=300,
        margin={"l": 40, "r": 10, "t": 40, "b": 60},
        yaxis={"title": "ROC-AUC"},
    )
    return figure


def _div(figure: go.Figure) -> str:
    return str(figure.to_html(full_html=False, include_plotlyjs=False))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _status(status: str) -> str:
    color = _COLORS.get(status, "#555")
    return f'<span class="status" style="background:{color}">{html.escape(status)}</span>'


def _feature_rows(features: Sequence[dict[str, Any]]) -> str:
    rows = []
    for f in features:
        s = f["statistics"]
        alarm_at = max(f["threshold"], f["noise_floor"])
        rows.append(
            "<tr>"
            f"<td>{html.escape(f['column'])}</td>"
            f"<td>{_status(f['status'])}</td>"
            f"<td>{_fmt(s.get('psi'))}</td><td>{_fmt(s.get('ks'))}</td>"
            f"<td>{_fmt(s.get('wasserstein'))}</td><td>{_fmt(s.get('wasserstein_norm'))}</td>"
            f"<td>{_fmt(s.get('js'))}</td>"
            f"<td>{html.escape(f['decided_by'])} ≥ {_fmt(alarm_at)}</td>"
            f"<td>{f['current_trips']}</td>"
            "</tr>"
        )
    return "\n".join(rows)


def render_report(
    result: dict[str, Any],
    reference: TripProfile,
    current: TripProfile,
    history: Sequence[dict[str, Any]] = (),
) -> str:
    """The HTML page of one monitoring result."""
    verdict = str(result["verdict"])
    window = result["window"]
    model = result["model"]
    charts: list[str] = []
    for name, edges in current.edges.numeric.items():
        ref = reference.overall.numeric.get(name)
        cur = current.overall.numeric.get(name)
        if ref is not None and cur is not None:
            charts.append(_div(_histogram(name, ref, cur, edges)))
    slices = "\n".join(
        "<tr>"
        f"<td>{html.escape(s['column'])}</td><td>{html.escape(s['value'])}</td>"
        f"<td>{s['trips']}</td><td>{_status(s['status'])}</td>"
        f"<td>{html.escape(s['compared_with'])}</td>"
        f"<td>{html.escape(', '.join(s['drifted']) or '–')}</td>"
        "</tr>"
        for s in result["slices"]
    )
    alarms = "".join(f"<li>{html.escape(a)}</li>" for a in result["alarms"]) or "<li>none</li>"
    performance = result["performance"]
    perf_rows = []
    for key, title in (
        ("estimated", "estimated (window)"),
        ("estimated_on_matured", "estimated (matured window)"),
        ("realised", "realised (matured window)"),
    ):
        values = performance.get(key) or {}
        perf_rows.append(
            f"<tr><td>{title}</td><td>{_fmt(values.get('n'))}</td>"
            f"<td>{_fmt(values.get('roc_auc'))}</td><td>{_fmt(values.get('pr_auc'))}</td>"
            f"<td>{_fmt(values.get('brier'))}</td><td>{_fmt(values.get('f1'))}</td>"
            f"<td>{_fmt(values.get('calibration_error'))}</td></tr>"
        )
    quality = result["data_quality"]
    quality_json = html.escape(json.dumps(quality, indent=2, default=str))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>driverscore monitoring — {html.escape(verdict)}</title>
<script>{get_plotlyjs()}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 24px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; text-align: left; }}
.status {{ color: white; padding: 1px 8px; border-radius: 8px; }}
.verdict {{ font-size: 20px; }}
.charts {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); }}
pre {{ background: #f5f5f5; padding: 8px; font-size: 12px; }}
</style>
</head>
<body>
<h1>Model monitoring</h1>
<p class="verdict">{_status(verdict)} {html.escape(str(result["summary"]))}</p>
<p>Model {html.escape(str(model["name"]))} version {html.escape(str(model["version"]))}
(reference: {model["reference_trips"]} trips, {html.escape(str(model["reference_source"]))});
window {html.escape(str(window["start"]))} to {html.escape(str(window["end"]))},
{result["trips"]} trips. Result schema {html.escape(str(result["result_schema_version"]))},
run {html.escape(str(result["run_id"]))}.</p>
<h2>Alarms</h2><ul>{alarms}</ul>
<h2>Drift per column (window vs reference)</h2>
<table><tr><th>column</th><th>status</th><th>PSI</th><th>KS</th><th>Wasserstein</th>
<th>W / ref. std</th><th>Jensen–Shannon</th><th>alarm at</th><th>trips</th></tr>
{_feature_rows(result["features"])}</table>
<h2>Score distribution</h2>
<div class="charts">{_div(_bands(result["band_shares"]))}</div>
<h2>Performance</h2>
<table><tr><th></th><th>trips</th><th>ROC-AUC</th><th>PR-AUC</th><th>Brier</th><th>F1</th>
<th>calibration error</th></tr>{"".join(perf_rows)}</table>
<div class="charts">{_div(_trend(history, result))}</div>
<h2>Per fleet and client</h2>
<table><tr><th>slice</th><th>value</th><th>trips</th><th>status</th><th>compared with</th>
<th>drifted</th></tr>{slices}</table>
<h2>Reference vs window, per column</h2>
<div class="charts">{"".join(charts)}</div>
<h2>Window vs previous window</h2>
<table><tr><th>column</th><th>status</th><th>PSI</th><th>KS</th><th>Wasserstein</th>
<th>W / ref. std</th><th>Jensen–Shannon</th><th>alarm at</th><th>trips</th></tr>
{_feature_rows(result["vs_previous_window"])}</table>
<h2>Data quality</h2>
<pre>{quality_json}</pre>
</body>
</html>
"""
