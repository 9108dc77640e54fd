"""Find URLs, e-mails and phone numbers in a model's answer and check them against a whitelist.

The api gateway calls :func:`postprocess` on whole answers and :class:`StreamFilter` on streamed
ones. Both cut the text into the same *regions* so that a stream, however it is chunked, yields
exactly ``postprocess(text)[0]``:

* a region ends after a whitespace character, except a space (or no-break space) that follows a
  digit or ``)``, which may sit inside a phone number such as ``+33 (0)1 23 45 67 89``. No
  URL, e-mail or phone pattern can cross such a boundary, and every look-around of the patterns
  looks only at non-whitespace, so scanning regions one by one finds what scanning the whole text
  finds;
* a region that reaches ``MAX_REGION`` characters also ends at its next whitespace, so the text
  a stream holds back stays bounded even for a long run of spaced digits.

A stream therefore holds back only the unfinished last word (or the unfinished spaced number).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pyalbert.errors import AlbertError
from pyalbert.whitelist.normalize import (
    email_domain,
    normalize_domain,
    normalize_email,
    normalize_phone,
    normalize_url,
    parent_domains,
    url_host,
    url_key,
)

Kind = Literal["url", "email", "phone"]
Mode = Literal["off", "flag", "redact"]
KINDS: tuple[Kind, ...] = ("url", "email", "phone")
MODES: tuple[Mode, ...] = ("off", "flag", "redact")
#: entry lists of the whitelist file, by kind of finding they allow
ENTRY_KEYS = ("urls", "domains", "emails", "phones")
FILE_FORMAT_VERSION = 1

REDACTIONS: dict[str, str] = {
    "url": "[unverified link removed]",
    "email": "[unverified e-mail removed]",
    "phone": "[unverified phone number removed]",
}

#: a region longer than this ends at its next whitespace, whatever precedes it
MAX_REGION = 512

_SEP = r"[ .\-\u00a0\u202f]"
_URL = r"(?P<url>(?<![\w.\-/@])(?:https?://|www\.)[^\s<>\"'`\[\]{}|\\^]+)"
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
_DIGIT = re.compile(r"[0-9]")
_SHORT_NUMBER = re.compile(r"(?<![\w+])[0-9]{3,6}(?![\w])")
_URL_TRAILING = ".,;:!?'\"*_~"


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


def _scanner(region: str) -> re.Pattern[str] | None:
    return _pattern(
        _MAYBE_URL.search(region) is not None,
        "@" in region,
        _DIGIT.search(region) is not None,
    )


def _scan(region: str, pattern: re.Pattern[str]) -> Iterator[tuple[Kind, int, int, str]]:
    """Raw spans (kind, start, end, text) in one region."""
    for match in pattern.finditer(region):
        kind = match.lastgroup
        start, text = match.start(), match.group()
        if kind == "url":
            text = _trim_url(text)
        yield kind, start, start + len(text), text  # type: ignore[misc]


_MISSING = object()
_NORMALIZERS = {"url": normalize_url, "email": normalize_email, "phone": normalize_phone}


@dataclass(frozen=True)
class Finding:
    kind: Literal["url", "email", "phone"]
    start: int
    end: int
    text: str
    allowed: bool


@dataclass(frozen=True)
class Whitelist:
    """Normalised entries; ``version`` identifies the file they came from."""

    urls: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    emails: frozenset[str] = frozenset()
    phones: frozenset[str] = frozenset()
    version: str = "empty"
    _url_keys: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_url_keys", frozenset(url_key(u) for u in self.urls))

    @classmethod
    def empty(cls) -> Whitelist:
        return cls()

    @classmethod
    def from_entries(
        cls,
        *,
        urls: tuple[str, ...] | list[str] = (),
        domains: tuple[str, ...] | list[str] = (),
        emails: tuple[str, ...] | list[str] = (),
        phones: tuple[str, ...] | list[str] = (),
        version: str = "inline",
    ) -> Whitelist:
        """Normalise raw entries; invalid ones are ignored (``create_whitelist`` reports them)."""

        def norm(values, func) -> frozenset[str]:
            return frozenset(v for v in map(func, values) if v)

        return cls(
            urls=norm(urls, normalize_url),
            domains=norm(domains, normalize_domain),
            emails=norm(emails, normalize_email),
            phones=norm(phones, normalize_phone),
            version=version,
        )

    @classmethod
    def load(cls, path: str | Path) -> Whitelist:
        """Read the JSON written by ``albert create_whitelist``."""
        path = Path(path)
        fix = "run `albert create_whitelist --env ENV` to (re)build it, or point the api at the right file"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise AlbertError(
                f"whitelist file {path} cannot be read ({exc.strerror}). Fix: {fix}."
            ) from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AlbertError(f"whitelist file {path} is not valid JSON ({exc}). Fix: {fix}.") from None
        if not isinstance(data, dict) or data.get("version") != FILE_FORMAT_VERSION:
            raise AlbertError(
                f"whitelist file {path} is not a version {FILE_FORMAT_VERSION} whitelist "
                f"(key 'version' is {data.get('version') if isinstance(data, dict) else None!r}). "
                f"Fix: {fix}."
            )
        entries = data.get("entries")
        if not isinstance(entries, dict) or not all(
            isinstance(entries.get(k, []), list) and all(isinstance(v, str) for v in entries.get(k, []))
            for k in ENTRY_KEYS
        ):
            raise AlbertError(
                f"whitelist file {path}: key 'entries' must map {', '.join(ENTRY_KEYS)} to lists "
                f"of strings. Fix: {fix}."
            )
        unknown = sorted(set(entries) - set(ENTRY_KEYS))
        if unknown:
            raise AlbertError(
                f"whitelist file {path}: unknown entry list(s) {', '.join(unknown)} under 'entries' "
                f"(known: {', '.join(ENTRY_KEYS)}). Fix: {fix}."
            )
        return cls.from_entries(
            **{k: entries.get(k, []) for k in ENTRY_KEYS},
            version=hashlib.sha256(raw).hexdigest()[:12],
        )

    def __len__(self) -> int:
        return len(self.urls) + len(self.domains) + len(self.emails) + len(self.phones)

    def _domain_allowed(self, host: str) -> bool:
        return any(d in self.domains for d in parent_domains(host))

    def allows(self, kind: str, text: str) -> bool:
        """Is this URL / e-mail / phone number (as written anywhere) on the list?"""
        if kind == "url":
            url = normalize_url(text)
            return url is not None and (
                url_key(url) in self._url_keys or self._domain_allowed(url_host(url))
            )
        if kind == "email":
            email = normalize_email(text)
            return email is not None and (
                email in self.emails or self._domain_allowed(email_domain(email))
            )
        if kind == "phone":
            phone = normalize_phone(text)
            return phone is not None and phone in self.phones
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")

    def _verdict(self, kind: str, text: str) -> bool | None:
        """``allows`` with a cache; ``None`` when the span is not a valid URL/e-mail/phone."""
        key = (kind, text)
        cached = self._cache.get(key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        valid = _NORMALIZERS[kind](text) is not None
        verdict = self.allows(kind, text) if valid else None
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[key] = verdict
        return verdict

    def _check(self, region: str, offset: int) -> Iterator[Finding]:
        pattern = _scanner(region)
        if pattern is None:
            return
        for kind, start, end, text in _scan(region, pattern):
            allowed = self._verdict(kind, text)
            if allowed is not None:
                yield Finding(kind, offset + start, offset + end, text, allowed)

    def findings(self, text: str) -> list[Finding]:
        """Every URL, e-mail and phone number in ``text``, allowed or not.

        Short numbers (``3949``) are reported only when listed: any 4-digit figure would
        otherwise be a phone number.
        """
        out: list[Finding] = []
        for start, end in _regions(text):
            out.extend(self._check(text[start:end], start))
        short = {p for p in self.phones if not p.startswith("+")}
        if short:
            taken = [(f.start, f.end) for f in out]
            for m in _SHORT_NUMBER.finditer(text):
                if m.group() in short and not any(s < m.end() and m.start() < e for s, e in taken):
                    out.append(Finding("phone", m.start(), m.end(), m.group(), True))
            out.sort(key=lambda f: f.start)
        return out


def _regions(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive scan units covering ``text`` (see the module docstring)."""
    splitter = _Splitter()
    start = 0
    for cut in splitter.cuts(text, 0):
        yield start, cut
        start = cut
    if start < len(text):
        yield start, len(text)


class _Splitter:
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


def _apply(region: str, offset: int, wl: Whitelist, mode: Mode, found: list[Finding]) -> str:
    """Flag or redact the disallowed spans of one region; append them to ``found``."""
    if _scanner(region) is None:
        return region
    pieces: list[str] = []
    last = 0
    for finding in wl._check(region, offset):
        if finding.allowed:
            continue
        found.append(finding)
        if mode == "redact":
            pieces.append(region[last : finding.start - offset])
            pieces.append(REDACTIONS[finding.kind])
            last = finding.end - offset
    if not pieces:
        return region
    pieces.append(region[last:])
    return "".join(pieces)


class StreamFilter:
    """Post-process a streamed answer chunk by chunk, holding back only an unfinished tail."""

    def __init__(self, wl: Whitelist, mode: Mode):
        if mode not in MODES:
            raise ValueError(f"unknown whitelist mode {mode!r}: use one of {', '.join(MODES)}")
        self.wl = wl
        self.mode = mode
        self.findings: list[Finding] = []
        self._pending = ""  # text of the open region, not emitted yet
        self._offset = 0  # position of _pending in the whole stream
        self._splitter = _Splitter()

    @property
    def held(self) -> int:
        """Characters held back right now."""
        return len(self._pending)

    def feed(self, chunk: str) -> str:
        if self.mode == "off" or not chunk:
            return chunk
        buf = self._pending + chunk
        cuts = self._splitter.cuts(buf, len(self._pending))
        if not cuts:
            self._pending = buf
            return ""
        pieces, start = [], 0
        for cut in cuts:
            pieces.append(_apply(buf[start:cut], self._offset + start, self.wl, self.mode, self.findings))
            start = cut
        self._pending = buf[start:]
        self._offset += start
        self._splitter.region_start -= start
        return "".join(pieces) if len(pieces) > 1 else pieces[0]

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        if not rest:
            return ""
        out = _apply(rest, self._offset, self.wl, self.mode, self.findings)
        self._offset += len(rest)
        self._splitter.region_start = 0
        return out


def postprocess(text: str, wl: Whitelist, mode: Mode) -> tuple[str, list[Finding]]:
    """off: ``(text, [])``; flag: ``(text, disallowed findings)``; redact: disallowed spans
    replaced by ``[unverified link removed]`` and the like."""
    if mode == "off":
        return text, []
    stream = StreamFilter(wl, mode)
    out = stream.feed(text) + stream.flush()
    return out, stream.findings
