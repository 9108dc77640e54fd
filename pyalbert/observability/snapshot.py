"""The dashboard's panels drawn as one SVG from a Prometheus, for places without Grafana (the
README): the same queries as ``docs/dashboard.json``, over the last minutes.

    python -m pyalbert.observability.snapshot --prometheus http://127.0.0.1:9090 --minutes 10 \\
        --window 1m > docs/dashboard-snapshot.svg
"""

from __future__ import annotations

import argparse
import html
import math
import re
import sys
import time
from collections.abc import Sequence

import httpx

from pyalbert.observability import dashboard as d

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, H, PAD = 460, 210, 36

Series = tuple[str, list[tuple[float, float]]]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def query_range(client: httpx.Client, prom: str, expr: str, start: float, end: float,
                step: float) -> list[dict]:
    resp = client.get(f"{prom.rstrip('/')}/api/v1/query_range",
                      params={"query": expr, "start": start, "end": end, "step": step})
    resp.raise_for_status()
    return resp.json()["data"]["result"]


def _fmt(value: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit == "s":
        return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"
    return f"{value:.3g}"


def chart(title: str, unit: str, series: Sequence[Series], x0: float, y0: float) -> list[str]:
    """One panel at (x0, y0): axes, max label, a polyline per series, the legend."""
    out = [f'<g transform="translate({x0},{y0})">',
           f'<rect width="{W}" height="{H}" fill="#fff" stroke="#ccc"/>',
           f'<text x="8" y="16" font-weight="bold">{html.escape(title)}</text>']
    points = [(t, v) for _, pts in series for t, v in pts if math.isfinite(v)]
    if not points:
        out += [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#999">no data</text>', "</g>"]
        return out
    t_min, t_max = min(t for t, _ in points), max(t for t, _ in points)
    v_max = max(max(v for _, v in points), 1e-9)
    plot_w, plot_h = W - PAD - 10, H - PAD - 40
    out.append(f'<text x="4" y="{28 + 8}" fill="#666">{_fmt(v_max, unit)}</text>')
    out.append(f'<line x1="{PAD}" y1="{28 + plot_h}" x2="{PAD + plot_w}" y2="{28 + plot_h}" stroke="#999"/>')
    for i, (name, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        xy = " ".join(
            f"{PAD + (t - t_min) / max(t_max - t_min, 1e-9) * plot_w:.1f},{28 + plot_h - v / v_max * plot_h:.1f}"
            for t, v in pts if math.isfinite(v))
        if xy:
            out.append(f'<polyline points="{xy}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out.append(f'<text x="{PAD + (i % 3) * 140}" y="{H - 22 + (i // 3) * 12}" fill="{colour}" '
                   f'font-size="10">{html.escape(name[:28])}</text>')
    out.append("</g>")
    return out


def render(panels: Sequence[tuple[str, str, Sequence[Series]]], title: str) -> str:
    cols = 2
    rows = math.ceil(len(panels) / cols)
    width, height = cols * (W + 10) + 10, rows * (H + 10) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="#f4f5f5"/>',
           f'<text x="10" y="24" font-size="16" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, unit, series) in enumerate(panels):
        out += chart(name, unit, series, 10 + (i % cols) * (W + 10), 36 + (i // cols) * (H + 10))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def snapshot(prom: str, minutes: float, window: str, now: float | None = None) -> str:
    end = now or time.time()
    start, step = end - minutes * 60, max(minutes * 60 / 120, 1.0)
    panels = []
    with httpx.Client(timeout=30) as client:
        for p in d.build()["panels"]:
            if p["type"] == "row":
                continue
            series: list[Series] = []
            for t in p["targets"]:
                expr = t["expr"].replace("$__rate_interval", window).replace('"$model"', '".*"')
                for item in query_range(client, prom, expr, start, end, step):
                    series.append((legend(t["legendFormat"], item["metric"]),
                                   [(float(ts), float(v)) for ts, v in item["values"]]))
            panels.append((p["title"], p["fieldConfig"]["defaults"]["unit"], series))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(end))
    return render(panels, f"Albert Deploy dashboard: last {minutes:g} min, {stamp}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyalbert.observability.snapshot")
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--window", default="1m")
    args = parser.parse_args(argv)
    sys.stdout.write(snapshot(args.prometheus, args.minutes, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
