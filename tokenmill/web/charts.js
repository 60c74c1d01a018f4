// Shared by the dashboard pages: hand-drawn SVG line charts, number formatting, and a poller that
// asks only for the points it does not have yet. Plain browser JS, no dependencies.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_W = 480, CHART_H = 170;
const PAD = {left: 52, right: 10, top: 10, bottom: 22};

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4))
                                      : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Numbers as a person reads them: seconds below one as ms, fractions as %, dollars with a $.
function fmt(value, unit) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (unit === "s") {
    if (value === 0) return "0";
    return value < 1 ? (value * 1000).toFixed(value < 0.01 ? 2 : 1) + " ms"
                     : value.toFixed(2) + " s";
  }
  if (unit === "%") return value.toFixed(value >= 10 ? 0 : 1) + "%";
  if (unit === "$") return "$" + (value >= 100 ? value.toFixed(0) : value.toPrecision(3));
  if (Math.abs(value) >= 1000) return (value / 1000).toFixed(1) + "k";
  if (Number.isInteger(value)) return String(value);
  if (Math.abs(value) >= 100) return value.toFixed(0);
  return String(Number(value.toPrecision(3)));
}

// A y-axis top that is 1, 2 or 5 times a power of ten, so the grid lines land on round numbers.
function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

// One chart: series = [{label, color, value: point => number|null}], unit as fmt takes it.
class LineChart {
  constructor(container, {title, unit, series, note}) {
    this.unit = unit;
    this.series = series;
    this.svg = el("svg:svg", {viewBox: `0 0 ${CHART_W} ${CHART_H}`, class: "chart",
                              role: "img", "aria-label": title, "data-points": "0"});
    this.legend = el("div", {class: "legend"});
    this.legendValues = series.map((s) => {
      const value = el("b", {}, "–");
      this.legend.append(el("span", {}, el("i", {style: `background:${s.color}`}), s.label,
                            " ", value));
      return value;
    });
    const card = el("section", {class: "card", "data-chart": title},
                    el("h3", {}, title), this.svg, this.legend);
    if (note) card.append(el("p", {class: "note"}, note));
    container.append(card);
  }

  // points: oldest first, each with a wall-clock `time` in seconds.
  update(points) {
    const svg = this.svg;
    svg.replaceChildren();
    const plotW = CHART_W - PAD.left - PAD.right, plotH = CHART_H - PAD.top - PAD.bottom;
    const t1 = points.length ? points[points.length - 1].time : 0;
    const span = Math.max(60, points.length ? t1 - points[0].time : 0);
    const t0 = t1 - span;
    let top = 0;
    const values = this.series.map((s) => points.map((p) => {
      const v = s.value(p);
      const ok = v !== null && v !== undefined && Number.isFinite(v);
      if (ok) top = Math.max(top, v);
      return ok ? v : null;
    }));
    top = niceMax(top);
    const x = (t) => PAD.left + (t - t0) / span * plotW;
    const y = (v) => PAD.top + plotH - v / top * plotH;
    // Four steps of 0.25 or 0.5 times a power of ten, five of one: round labels either way.
    const divisions = top / Math.pow(10, Math.floor(Math.log10(top))) === 5 ? 5 : 4;
    for (let i = 0; i <= divisions; i++) {
      const v = top * i / divisions;
      svg.append(el("svg:line", {x1: PAD.left, x2: CHART_W - PAD.right, y1: y(v), y2: y(v),
                                 class: i ? "grid" : "axis"}));
      svg.append(el("svg:text", {x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end"},
                    fmt(v, this.unit)));
    }
    for (const [label, t] of [[`-${Math.round(span)} s`, t0], ["now", t1]]) {
      svg.append(el("svg:text", {x: x(t), y: CHART_H - 6,
                                 "text-anchor": t === t0 ? "start" : "end"}, label));
    }
    let drawn = 0;  // the most points any one series has on the chart
    this.series.forEach((s, i) => {
      // Gaps (null: nothing to measure then) break the line instead of drawing a fake zero; a
      // point alone between gaps gets a dot, as a line through one point is invisible.
      const segments = [[]];
      values[i].forEach((v, j) => {
        if (v === null) { if (segments[segments.length - 1].length) segments.push([]); return; }
        segments[segments.length - 1].push([x(points[j].time), y(v)]);
      });
      let d = "", count = 0;
      for (const segment of segments) {
        count += segment.length;
        if (segment.length === 1) {
          svg.append(el("svg:circle", {cx: segment[0][0], cy: segment[0][1], r: 2.5,
                                       fill: s.color, "data-series": s.label}));
        } else if (segment.length) {
          d += segment.map(([px, py], k) => `${k ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`)
                      .join("");
        }
      }
      if (d) svg.append(el("svg:path", {d, stroke: s.color, class: "line",
                                        "data-series": s.label}));
      drawn = Math.max(drawn, count);
      const latest = values[i].length ? values[i][values[i].length - 1] : null;
      this.legendValues[i].textContent = fmt(latest, this.unit);
    });
    svg.setAttribute("data-points", String(drawn));
  }
}

// Polls `url` every `intervalMs`; the first call gets the whole history, later calls only the
// points after the newest one held (?since=seq). onData(data, points) gets every answer.
function startPolling(url, intervalMs, onData, statusNode) {
  let points = [], latestSeq = 0;
  async function tick() {
    try {
      const sep = url.includes("?") ? "&" : "?";
      const response = await fetch(`${url}${sep}since=${latestSeq}`, {cache: "no-store"});
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      if (data.latest_seq < latestSeq) points = [];  // the process restarted
      points = points.concat(data.points);
      if (points.length > data.max_points) points = points.slice(points.length - data.max_points);
      latestSeq = data.latest_seq;
      document.body.dataset.latestSeq = String(latestSeq);  // how far the page has read
      onData(data, points);
      statusNode.textContent = "live · updated " + new Date().toLocaleTimeString();
      statusNode.className = "status ok";
    } catch (error) {
      statusNode.textContent = `cannot read ${url}: ${error.message}; retrying`;
      statusNode.className = "status error";
    } finally {
      setTimeout(tick, intervalMs);
    }
  }
  tick();
}
