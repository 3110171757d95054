// The loss, held-out loss and learning-rate chart of the jobs tab: hand-written SVG, no library.

import { svg } from "./api.js";

// About `count` round values (1, 2 or 5 times a power of ten apart) between lo and hi.
function niceTicks(lo, hi, count = 4) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => span / s <= count + 0.5) ?? 10 * power;
  const ticks = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

export function formatNumber(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "";
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return value.toExponential(2);
  return Number(value.toPrecision(4)).toString();
}

// Loss (left axis: raw in light, smoothed in dark once there are many steps), the held-out loss of each validation
// (left axis too, its own colour: the `validation_loss` events) and learning rate (right axis, dashed) against the
// step. `points`: [[step, {loss, lr}], ...] sorted by step; `heldOut`: [[step, loss], ...] sorted by step.
export function drawLossChart(chart, points, maxSteps, heldOut = []) {
  const W = 640, H = 240, L = 52, R = 58, T = 26, B = 30;
  chart.replaceChildren();
  if (!points.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" }, "no steps yet"));
    return;
  }
  const steps = points.map((p) => p[0]);
  const losses = [...points.map((p) => p[1].loss), ...heldOut.map((p) => p[1])].filter(Number.isFinite);
  const lrs = points.map((p) => p[1].lr).filter(Number.isFinite);
  const xMax = Math.max(maxSteps || 0, steps[steps.length - 1], 1);
  const xMin = Math.min(steps[0], heldOut.length ? heldOut[0][0] : 0, 0);
  let lossMin = Math.min(...losses), lossMax = Math.max(...losses);
  if (lossMax - lossMin < 1e-12) { lossMin -= 0.5 * Math.abs(lossMin || 1); lossMax += 0.5 * Math.abs(lossMax || 1); }
  const pad = (lossMax - lossMin) * 0.05;
  lossMin -= pad; lossMax += pad;
  const lrMax = Math.max(...lrs, 0) || 1;
  const x = (s) => L + ((s - xMin) / (xMax - xMin || 1)) * (W - L - R);
  const yLoss = (v) => T + (1 - (v - lossMin) / (lossMax - lossMin)) * (H - T - B);
  const yLr = (v) => T + (1 - v / (lrMax * 1.05)) * (H - T - B);

  chart.append(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot-area" }));
  for (const v of niceTicks(lossMin, lossMax)) {
    chart.append(svg("line", { x1: L, x2: W - R, y1: yLoss(v), y2: yLoss(v), class: "grid-line" }));
    chart.append(svg("text", { x: L - 6, y: yLoss(v) + 4, "text-anchor": "end", class: "axis loss-axis" }, formatNumber(v)));
  }
  for (const v of niceTicks(0, lrMax * 1.05)) {
    chart.append(svg("text", { x: W - R + 6, y: yLr(v) + 4, class: "axis lr-axis" }, formatNumber(v)));
  }
  for (const s of niceTicks(xMin, xMax, 6).filter(Number.isInteger)) {
    chart.append(svg("line", { x1: x(s), x2: x(s), y1: H - B, y2: H - B + 4, class: "grid-line" }));
    chart.append(svg("text", { x: x(s), y: H - B + 16, "text-anchor": "middle", class: "axis" }, String(s)));
  }
  chart.append(svg("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle", class: "axis" }, "step"));

  const line = (values, y, cls) => {
    const d = values.filter(([, v]) => Number.isFinite(v)).map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    if (d) chart.append(svg("polyline", { points: d, class: cls }));
  };
  line(points.map(([s, p]) => [s, p.lr]), yLr, "lr-line");
  line(points.map(([s, p]) => [s, p.loss]), yLoss, points.length > 10 ? "loss-raw" : "loss-line");
  if (points.length > 10) {
    // exponential moving average, as TensorBoard's smoothing (weight 0.9); a skipped step's loss (null: it was
    // not finite) leaves it as it was
    let ema = null;
    const smooth = (v) => (Number.isFinite(v) ? (ema = ema === null ? v : 0.9 * ema + 0.1 * v) : ema);
    line(points.map(([s, p]) => [s, smooth(p.loss)]), yLoss, "loss-line");
  }
  line(heldOut, yLoss, "heldout-line");
  for (const [s, v] of heldOut) if (Number.isFinite(v)) chart.append(svg("circle", { cx: x(s), cy: yLoss(v), r: 3, class: "heldout-dot" }));
  if (points.length <= 60) {
    for (const [s, p] of points) if (Number.isFinite(p.loss)) chart.append(svg("circle", { cx: x(s), cy: yLoss(p.loss), r: 2.5, class: "loss-dot" }));
  }
  const legend = svg("g", { transform: `translate(${L},${T - 10})`, class: "legend" });
  legend.append(svg("line", { x1: 0, x2: 18, y1: -4, y2: -4, class: "loss-line" }), svg("text", { x: 24, y: 0 }, "loss"),
    svg("line", { x1: 70, x2: 88, y1: -4, y2: -4, class: "lr-line" }), svg("text", { x: 94, y: 0 }, "learning rate"));
  if (heldOut.length) {
    legend.append(svg("line", { x1: 190, x2: 208, y1: -4, y2: -4, class: "heldout-line" }), svg("text", { x: 214, y: 0 }, "held-out loss"));
  }
  chart.append(legend);
  const heldOutAt = new Map(heldOut);

  // hover read-out: the nearest logged step
  const marker = svg("line", { y1: T, y2: H - B, class: "hover-line", visibility: "hidden" });
  const readout = svg("text", { x: W - R, y: T - 10, "text-anchor": "end", class: "readout" });
  chart.append(marker, readout);
  chart.onmousemove = (event) => {
    const box = chart.getBoundingClientRect();
    const sx = ((event.clientX - box.left) / box.width) * W;
    const target = xMin + ((sx - L) / (W - L - R)) * (xMax - xMin);
    let best = points[0];
    for (const p of points) if (Math.abs(p[0] - target) < Math.abs(best[0] - target)) best = p;
    marker.setAttribute("x1", x(best[0]));
    marker.setAttribute("x2", x(best[0]));
    marker.setAttribute("visibility", "visible");
    const held = heldOutAt.has(best[0]) ? `, held-out ${formatNumber(heldOutAt.get(best[0]))}` : "";
    readout.textContent = `step ${best[0]}: loss ${formatNumber(best[1].loss)}${held}, lr ${formatNumber(best[1].lr)}`;
  };
  chart.onmouseleave = () => { marker.setAttribute("visibility", "hidden"); readout.textContent = ""; };
}
