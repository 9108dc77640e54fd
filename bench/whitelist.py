"""Matcher throughput: streamed chunks per second and whole-answer MB/s, per mode.

    .venv/bin/python bench/whitelist.py [--chunks N]

The gateway relays >= 20,000 SSE chunks/s; each chunk goes through StreamFilter.feed. "max held"
is the most characters held back at once, "delayed" the share of chunks not sent whole at once
(flag: none; redact: only chunks with a candidate link, e-mail domain or phone number).
"""

from __future__ import annotations

import argparse
import re
import time

from pyalbert.whitelist import StreamFilter, Whitelist, postprocess

PROSE = ("Pour renouveler votre carte d'identité, prenez rendez-vous en mairie. Les délais "
         "varient selon les communes et la saison, comptez plusieurs semaines en été. ")
LINKY = ("Consultez https://www.service-public.fr/particuliers/vosdroits/F1342?utm_source=x ou "
         "https://evil.example/phish, écrivez à contact@albert.fr ou fraude@evil.example, "
         "appelez le 3939 ou le 01 23 45 67 89 (en 2024, 15 000 appels). ")
WL = Whitelist.from_entries(domains=["service-public.fr", "gouv.fr"], emails=["contact@albert.fr"],
                            phones=["3939"])


def tokens(text: str, n: int) -> list[str]:
    """Split like an LLM stream: a word and its leading space per chunk (~5 characters)."""
    words = re.findall(r"\s*\S+", text)
    return (words * (n // len(words) + 1))[:n]


def stream_rate(chunks: list[str], mode: str) -> tuple[float, int, float]:
    stream = StreamFilter(WL, mode)  # type: ignore[arg-type]
    start = time.perf_counter()
    for chunk in chunks:
        stream.feed(chunk)
    stream.flush()
    rate = len(chunks) / (time.perf_counter() - start)
    stream = StreamFilter(WL, mode)  # type: ignore[arg-type]
    held = delayed = 0
    for chunk in chunks[:20_000]:
        delayed += stream.feed(chunk) != chunk or stream.held > 0
        held = max(held, stream.held)
    return rate, held, delayed / min(len(chunks), 20_000)


def baseline_rate(chunks: list[str]) -> float:
    start = time.perf_counter()
    out = []
    for chunk in chunks:
        out.append(chunk.encode())
    return len(chunks) / (time.perf_counter() - start)


def whole_rate(text: str, mode: str, repeat: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        postprocess(text, WL, mode)  # type: ignore[arg-type]
    return len(text.encode()) * repeat / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    args = parser.parse_args()
    print(f"{'text':<8} {'mode':<7} {'chunks/s':>12} {'vs encode':>10} {'max held':>9} {'delayed':>8}"
          f" {'whole MB/s':>11}")
    for name, text in (("prose", PROSE), ("links", LINKY)):
        chunks = tokens(text, args.chunks)
        base = baseline_rate(chunks)
        for mode in ("off", "flag", "redact"):
            rate, held, delayed = stream_rate(chunks, mode)
            mbs = whole_rate("".join(chunks[:20_000]), mode)
            print(f"{name:<8} {mode:<7} {rate:>12,.0f} {rate / base:>9.2f}x {held:>9} {delayed:>8.0%}"
                  f" {mbs:>11.1f}")
    print("(vs encode: the same loop doing only chunk.encode(); target >= 20,000 chunks/s)")


if __name__ == "__main__":
    main()
