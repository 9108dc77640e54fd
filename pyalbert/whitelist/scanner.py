"""Where URLs, e-mails and phone numbers can be: the text cut into *regions*, the patterns, and
the *candidates* of an open region (what more text could still turn into a match).

Whole answers and streams cut the text into the same regions so that a stream, however it is
chunked, yields exactly ``postprocess(text)[0]``:

* a region ends after a whitespace character, except a space (or no-break space) that follows a
  digit or ``)``, which may sit inside a phone number such as ``+33 (0)1 23 45 67 89``. No
  URL, e-mail or phone pattern can cross such a boundary, and every look-around of the patterns
  looks only at non-whitespace, so scanning regions one by one finds what scanning the whole text
  finds;
* a region that reaches ``MAX_REGION`` characters also ends at its next whitespace, so the work
  per region stays bounded even for a long run of spaced digits.

A candidate is where a URL (``h``, ``ht``, ... ``https://...``, ``www...``) or a phone number
(``+``, ``0``, ``01 23``...) could still match, or an e-mail's domain after its ``@``; a phone
candidate is at most ``PHONE_MAX`` characters, a link or a domain at most a region.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Kind = Literal["url", "email", "phone"]
KINDS: tuple[Kind, ...] = ("url", "email", "phone")

#: a region longer than this ends at its next whitespace, whatever precedes it
MAX_REGION = 512

_SEP = r"[ .\-\u00a0\u202f]"
_URL_CHAR = r"[^\s<>\"'`\[\]{}|\\^]"
_URL = rf"(?P<url>(?<![\w.\-/@])(?:https?://|www\.){_URL_CHAR}+)"
_EMAIL = (
    r"(?P<email>(?<![\w.%+\-])[\w.%+\-]+@[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?"
    r"(?:\.[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)+)"
)
_PHONE = (
    r"(?P<phone>(?<![\w+])(?:"
    rf"(?:\+|00)33{_SEP}?(?:\(0\){_SEP}?)?[1-9](?:{_SEP}?[0-9]{{2}}){{4}}"
    rf"|\+[1-9][0-9]{{0,2}}(?:{_SEP}?(?:\([0-9]{{1,4}}\)|[0-9]{{1,4}})){{2,6}}"
    rf"|0[1-9](?:{_SEP}?[0-9]{{2}}){{4}}"
    r")(?![0-9]))"
)
#: whitespace that ends a region: not a space after a digit or ``)`` (phone separators)
_BOUNDARY = re.compile(r"(?<![0-9)])[ \u00a0\u202f]|[^\S \u00a0\u202f]")
_WHITESPACE = re.compile(r"\s")
#: cheap tests that decide which patterns can match a region at all
_MAYBE_URL = re.compile(r"://|www\.", re.IGNORECASE)
_MAYBE_ANY = re.compile(r"[0-9@]|://|www\.", re.IGNORECASE)
_DIGIT = re.compile(r"[0-9]")
SHORT_NUMBER = re.compile(r"(?<![\w+])[0-9]{3,6}(?![\w])")
_URL_TRAILING = ".,;:!?'\"*_~"

#: the longest phone match: "+", 3 digits and 6 groups like " (1234)"
PHONE_MAX = 46
#: candidates, each anchored at the end of the text: what more text could still make a match
#: (over-approximations: a candidate that cannot match is only held a little longer)
_PHONE_CHAR = r"[0-9()\u00a0\u202f .\-]"
_LIVE_URL = re.compile(
    rf"(?:(?:https?://|www\.){_URL_CHAR}*|h(?:t(?:t(?:p(?:s?:?/?)?)?)?)?|ww?w?)\Z", re.IGNORECASE)
_URL_START = re.compile(r"(?<![\w.\-/@])[hw]", re.IGNORECASE)
_LIVE_PHONE = re.compile(
    rf"(?:\+(?:[1-9]{_PHONE_CHAR}*)?|0(?:0(?:3(?:3{_PHONE_CHAR}*)?)?|[1-9]{_PHONE_CHAR}*)?)\Z")
_PHONE_START = re.compile(r"(?<![\w+])[+0]")
#: what any match or candidate but a plain word needs (a link starts with h or w)
MAYBE_CANDIDATE = re.compile(r"(?<![\w.\-/@])[hw]|[@+0-9]", re.IGNORECASE)


@lru_cache(maxsize=8)
def _pattern(url: bool, email: bool, phone: bool) -> re.Pattern[str] | None:
    """The scanner for the kinds a region may hold (an absent kind cannot change the result)."""
    parts = [p for p, on in ((_URL, url), (_EMAIL, email), (_PHONE, phone)) if on]
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def _trim_url(text: str) -> str:
    """Drop sentence punctuation and an unbalanced closing bracket after a URL."""
    while text:
        last = text[-1]
        if last in _URL_TRAILING or (last == ")" and text.count("(") < text.count(")")):
            text = text[:-1]
        else:
            break
    return text


def region_pattern(region: str) -> re.Pattern[str] | None:
    if _MAYBE_ANY.search(region) is None:  # most regions of prose: one search
        return None
    return _pattern(
        _MAYBE_URL.search(region) is not None,
        "@" in region,
        _DIGIT.search(region) is not None,
    )


def scan_region(region: str, pattern: re.Pattern[str],
          pos: int = 0) -> Iterator[tuple[Kind, int, int, str, int]]:
    """Raw spans (kind, start, end, text, end before trimming) in one region, from ``pos``."""
    for match in pattern.finditer(region, pos):
        kind = match.lastgroup
        start, text = match.start(), match.group()
        if kind == "url":
            text = _trim_url(text)
        yield kind, start, start + len(text), text, match.end()  # type: ignore[misc]


@dataclass(frozen=True)
class Finding:
    kind: Literal["url", "email", "phone"]
    start: int
    end: int
    text: str
    allowed: bool


def scan_regions(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive scan units covering ``text`` (see the module docstring)."""
    splitter = Splitter()
    start = 0
    for cut in splitter.cuts(text, 0):
        yield start, cut
        start = cut
    if start < len(text):
        yield start, len(text)


class Splitter:
    """Finds region ends in a text that grows at its end; remembers the open region's start.

    ``cuts`` returns only *forced* cuts (long regions) and, last, the latest natural boundary:
    text between natural boundaries may be scanned in one go.
    """

    def __init__(self) -> None:
        self.region_start = 0  # index, in the caller's buffer, of the open region

    def cuts(self, buf: str, scan_from: int) -> list[int]:
        out: list[int] = []
        start, pos = self.region_start, scan_from
        last_natural = None
        for match in _BOUNDARY.finditer(buf, scan_from):
            natural = match.end()
            if natural - start > MAX_REGION:
                if last_natural is not None:
                    out.append(last_natural)
                    last_natural = None
                start, pos = self._forced(buf, start, pos, natural, out)
            last_natural = start = pos = natural
        if last_natural is not None:
            out.append(last_natural)
        start, _ = self._forced(buf, start, pos, len(buf) + 1, out)
        self.region_start = start
        return out

    @staticmethod
    def _forced(buf: str, start: int, pos: int, before: int, out: list[int]) -> tuple[int, int]:
        """Cut a region that reached MAX_REGION at its next whitespace (ending before ``before``)."""
        while True:
            found = _WHITESPACE.search(buf, max(pos, start + MAX_REGION - 1))
            if not found or found.end() >= before:
                return start, pos
            out.append(found.end())
            start = pos = found.end()


Span = tuple[Kind, int, int, str, int]
LIVE_LOCAL = re.compile(r"(?<![\w.%+\-])[\w.%+\-]+\Z")
_LIVE_AT = re.compile(r"(?<![\w.%+\-])[\w.%+\-]+@[a-z0-9.\-]*\Z", re.IGNORECASE)


def region_spans(region: str, pos: int) -> list[Span]:
    """Matches of ``region`` from ``pos`` (no match crosses ``pos``)."""
    pattern = region_pattern(region[pos:] if pos else region)
    return list(scan_region(region, pattern, pos)) if pattern is not None else []


def pending_candidates(region: str, pos: int) -> list[tuple[int, int]]:
    """(start, hold from) of every match attempt from ``pos`` that more text could still change.

    An attempt that does not reach the end of ``region`` is decided: the patterns read nothing
    past a character they cannot take (and a phone number reads at most ``PHONE_MAX + 1``).
    """
    n = len(region)
    out = []
    for m in _URL_START.finditer(region, pos):
        if _LIVE_URL.match(region, m.start()):
            out.append((m.start(), m.start()))
    for m in _PHONE_START.finditer(region, max(pos, n - PHONE_MAX - 1)):
        if _LIVE_PHONE.match(region, m.start()):
            out.append((m.start(), m.start()))
    m = _LIVE_AT.search(region, pos)
    if m:
        out.append((m.start(), m.start() + m.group().index("@") + 1))
    m = LIVE_LOCAL.search(region, pos)
    if m:  # a word that may yet get an "@": nothing of it is ever redacted
        out.append((m.start(), n))
    out.sort()
    return out
