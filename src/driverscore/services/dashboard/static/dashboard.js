// driverscore dashboard: draws the page's Plotly figures and runs the live alerts feed.
// Figures come as JSON blocks written by the server (no inline script on the pages).
"use strict";

function drawCharts() {
  document.querySelectorAll("div[data-chart]").forEach((div) => {
    const spec = JSON.parse(document.getElementById(div.dataset.chart).textContent);
    Plotly.newPlot(div, spec.data, spec.layout, { displayModeBar: false, responsive: true });
  });
}

// Puts an alert row where its trip end belongs: the table stays newest first.
function placeAlert(tbody, alert) {
  if (tbody.querySelector(`tr[data-key="${CSS.escape(alert.key)}"]`)) return;
  const holder = document.createElement("tbody");
  holder.innerHTML = alert.html;
  const row = holder.firstElementChild;
  if (!alert.initial) row.classList.add("fresh");
  const later = Array.from(tbody.rows).find((r) => r.dataset.end < row.dataset.end);
  tbody.insertBefore(row, later || null);
}

function followAlerts() {
  const table = document.getElementById("alerts");
  if (!table) return;
  const status = document.getElementById("feed-status");
  const feed = new EventSource(`${document.body.dataset.base}/alerts/stream`);
  feed.addEventListener("alert", (e) => placeAlert(table.tBodies[0], JSON.parse(e.data)));
  feed.addEventListener("status", (e) => { status.textContent = JSON.parse(e.data).text; });
  feed.onerror = () => { status.textContent = "live feed: reconnecting…"; };
}

window.addEventListener("DOMContentLoaded", () => {
  drawCharts();
  followAlerts();
});
