"""The Prometheus text format (what vLLM and the gateway serve on /metrics), parsed, and
``histogram_quantile`` as Prometheus computes it. Enough for ``albert top`` without Prometheus.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Labels
    value: float

    def label(self, key: str, default: str = "") -> str:
        for k, v in self.labels:
            if k == key:
                return v
        return default


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _labels(text: str, pos: int, line: str) -> tuple[Labels, int]:
    """Parse ``{a="1",b="x\\"y"}`` starting after ``{``; return labels and the index after ``}``."""
    out: list[tuple[str, str]] = []
    n = len(text)
    while True:
        while pos < n and text[pos] in " ,":
            pos += 1
        if pos < n and text[pos] == "}":
            return tuple(sorted(out)), pos + 1
        eq = text.find("=", pos)
        if eq < 0:
            raise ParseError(f"label without '=': {line!r}")
        key = text[pos:eq].strip()
        if not key or eq + 1 >= n or text[eq + 1] != '"':
            raise ParseError(f"bad label {key!r}: {line!r}")
        pos, value = eq + 2, []
        while True:
            if pos >= n:
                raise ParseError(f"unterminated label value: {line!r}")
            ch = text[pos]
            if ch == "\\" and pos + 1 < n:
                value.append(_ESCAPES.get(text[pos + 1], "\\" + text[pos + 1]))
                pos += 2
            elif ch == '"':
                pos += 1
                break
            else:
                value.append(ch)
                pos += 1
        out.append((key, "".join(value)))


def _value(token: str, line: str) -> float:
    try:
        return float(token)  # also "NaN", "+Inf", "-Inf"
    except ValueError:
        raise ParseError(f"bad sample value {token!r}: {line!r}") from None


def parse(text: str) -> list[Sample]:
    """Every sample of a text exposition (comments and timestamps dropped)."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            labels, end = _labels(line, brace + 1, raw)
            rest = line[end:].split()
        else:
            if space < 0:
                raise ParseError(f"sample without a value: {raw!r}")
            name, labels, rest = line[:space], (), line[space:].split()
        if not rest or len(rest) > 2:
            raise ParseError(f"expected a value and an optional timestamp: {raw!r}")
        out.append(Sample(name, labels, _value(rest[0], raw)))
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus' ``histogram_quantile``: ``buckets`` maps upper bound (``le``, +Inf included)
    to cumulative count. NaN without observations."""
    if not buckets or math.inf not in buckets:
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    bounds = sorted(buckets)
    counts = [buckets[b] for b in bounds]
    for i in range(1, len(counts)):  # counters scraped mid-update may dip: Prometheus evens them
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if total == 0 or math.isnan(total):
        return math.nan
    rank = q * total
    i = next(i for i, c in enumerate(counts) if c >= rank)
    if i == len(bounds) - 1:
        return bounds[-2] if len(bounds) > 1 else math.nan
    if i == 0 and bounds[0] <= 0:
        return bounds[0]
    lower = 0.0 if i == 0 else bounds[i - 1]
    below = 0.0 if i == 0 else counts[i - 1]
    upper, inside = bounds[i], counts[i] - below
    if inside == 0:
        return math.nan  # q = 0 on an empty first bucket: Prometheus divides 0 by 0 too
    return lower + (upper - lower) * (rank - below) / inside


def buckets_of(samples: Iterable[Sample], histogram: str) -> dict[float, float]:
    """Cumulative bucket counts of ``<histogram>_bucket``, summed over label sets."""
    out: dict[float, float] = {}
    name = f"{histogram}_bucket"
    for s in samples:
        if s.name == name:
            le = float(s.label("le", "nan"))
            out[le] = out.get(le, 0.0) + s.value
    return out


def total(samples: Iterable[Sample], name: str) -> float | None:
    """Sum of every sample named ``name``; None when there is none."""
    values = [s.value for s in samples if s.name == name]
    return sum(values) if values else None
