// The live server panel: polls Prometheus text from /metrics, shows queue depth, running batch size, resident
// adapters, and tokens/s (from the generated-token counter) over the last minutes on a small canvas chart.

import { request } from "./api.js";

const WINDOW_MS = 5 * 60 * 1000;

/** Sum of every sample of `metric` (all label sets) in Prometheus text exposition format. */
export function sumMetric(text, metric) {
  let total = 0;
  let found = false;
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (match && match[1] === metric) {
      total += Number(match[3]);
      found = true;
    }
  }
  return found ? total : null;
}

function drawChart(canvas, points) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const now = Date.now();
  const peak = Math.max(1, ...points.map((p) => p.value));
  context.strokeStyle = "#ccd";
  context.fillStyle = "#667";
  context.font = "11px sans-serif";
  context.beginPath();
  context.moveTo(0, height - 0.5);
  context.lineTo(width, height - 0.5);
  context.stroke();
  context.fillText(`${peak.toFixed(1)} tok/s`, 4, 12);
  context.fillText("−5 min", 4, height - 4);
  context.fillText("now", width - 24, height - 4);
  if (points.length < 2) return;
  context.strokeStyle = "#2a6fdb";
  context.lineWidth = 2;
  context.beginPath();
  points.forEach((p, i) => {
    const x = width * (1 - (now - p.time) / WINDOW_MS);
    const y = height - 16 - (height - 32) * (p.value / peak);
    if (i === 0) context.moveTo(x, y); else context.lineTo(x, y);
  });
  context.stroke();
}

export function startMetricsPanel({ canvas, fields, onError, intervalMs = 2000 }) {
  const points = [];
  let previous = null;
  async function poll() {
    try {
      const text = await request("/metrics");
      const now = Date.now();
      const tokens = sumMetric(text, "hub_generated_tokens_total") ?? 0;
      fields.queue.textContent = sumMetric(text, "hub_queue_depth") ?? "–";
      fields.batch.textContent = sumMetric(text, "hub_running_batch_size") ?? "–";
      fields.resident.textContent = sumMetric(text, "hub_resident_adapters") ?? "–";
      if (previous) {
        const rate = Math.max(0, (tokens - previous.tokens) / ((now - previous.time) / 1000));
        points.push({ time: now, value: rate });
        fields.tps.textContent = rate.toFixed(1);
      }
      previous = { time: now, tokens };
      while (points.length && now - points[0].time > WINDOW_MS) points.shift();
      drawChart(canvas, points);
    } catch (err) {
      onError(err);
    }
  }
  poll();
  return setInterval(poll, intervalMs);
}
