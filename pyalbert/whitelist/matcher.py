"""Find URLs, e-mails and phone numbers in a model's answer and check them against a whitelist.

The api gateway calls :func:`postprocess` on whole answers and :class:`StreamFilter` on streamed
ones. Both cut the text into the same *regions* so that a stream, however it is chunked, yields
exactly ``postprocess(text)[0]``:

* a region ends after a whitespace character, except a space (or no-break space) that follows a
  digit or ``)``, which may sit inside a phone number such as ``+33 (0)1 23 45 67 89``. No
  URL, e-mail or phone pattern can cross such a boundary, and every look-around of the patterns
  looks only at non-whitespace, so scanning regions one by one finds what scanning the whole text
  finds;
* a region that reaches ``MAX_REGION`` characters also ends at its next whitespace, so the work
  per region stays bounded even for a long run of spaced digits.

Inside the open (last) region, ``redact`` emits at once everything that no continuation can put
under a redaction: it holds back only a *candidate*, the characters from where a URL
(``h``, ``ht``, ... ``https://...``, ``www...``) or a phone number (``+``, ``0``, ``01 23``...)
could still match, or an e-mail's domain after its ``@``. Plain words are never held: an e-mail's
local part is a plain word until its ``@`` arrives, so an unverified e-mail loses its domain
(``fraude@[unverified e-mail domain removed]``), in streams and whole answers alike. A phone
candidate is at most ``PHONE_MAX`` characters; a link or a domain at most a region. ``flag``
never changes the text: it relays every chunk as it arrives and matches on the side.
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
    "email": "[unverified e-mail domain removed]",
    "phone": "[unverified phone number removed]",
}

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
_SHORT_NUMBER = re.compile(r"(?<![\w+])[0-9]{3,6}(?![\w])")
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
_MAYBE_CANDIDATE = re.compile(r"(?<![\w.\-/@])[hw]|[@+0-9]", re.IGNORECASE)


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
    if _MAYBE_ANY.search(region) is None:  # most regions of prose: one search
        return None
    return _pattern(
        _MAYBE_URL.search(region) is not None,
        "@" in region,
        _DIGIT.search(region) is not None,
    )


def _scan(region: str, pattern: re.Pattern[str],
          pos: int = 0) -> Iterator[tuple[Kind, int, int, str, int]]:
    """Raw spans (kind, start, end, text, end before trimming) in one region, from ``pos``."""
    for match in pattern.finditer(region, pos):
        kind = match.lastgroup
        start, text = match.start(), match.group()
        if kind == "url":
            text = _trim_url(text)
        yield kind, start, start + len(text), text, match.end()  # type: ignore[misc]


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
        for kind, start, end, text, _ in _scan(region, pattern):
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


#: a piece of output: the stream positions [start, end) of the input it stands for, its text, and
#: whether that text is the input itself (else a redaction)
Segment = tuple[int, int, str, bool]
_Span = tuple[Kind, int, int, str, int]
_LIVE_LOCAL = re.compile(r"(?<![\w.%+\-])[\w.%+\-]+\Z")
_LIVE_AT = re.compile(r"(?<![\w.%+\-])[\w.%+\-]+@[a-z0-9.\-]*\Z", re.IGNORECASE)


def _spans(region: str, pos: int) -> list[_Span]:
    """Matches of ``region`` from ``pos`` (no match crosses ``pos``)."""
    pattern = _scanner(region[pos:] if pos else region)
    return list(_scan(region, pattern, pos)) if pattern is not None else []


def _redaction_start(kind: str, start: int, text: str) -> int:
    """Where a redaction begins: an e-mail keeps its local part and its ``@``."""
    return start + text.index("@") + 1 if kind == "email" else start


def _candidates(region: str, pos: int) -> list[tuple[int, int]]:
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
    m = _LIVE_LOCAL.search(region, pos)
    if m:  # a word that may yet get an "@": nothing of it is ever redacted
        out.append((m.start(), n))
    out.sort()
    return out


def _render(region: str, offset: int, wl: Whitelist, mode: Mode, spans: list[_Span], start: int,
            stop: int, found: list[Finding], out: list[Segment]) -> None:
    """Segments of ``region[start:stop]`` (``spans`` lie inside); disallowed spans go to ``found``
    and, in redact mode, are replaced."""
    last = start
    for kind, s, e, text, _ in spans:
        if wl._verdict(kind, text) is not False:
            continue
        found.append(Finding(kind, offset + s, offset + e, text, False))
        if mode == "redact":
            r = _redaction_start(kind, s, text)
            if r > last:
                out.append((offset + last, offset + r, region[last:r], True))
            out.append((offset + r, offset + e, REDACTIONS[kind], False))
            last = e
    if stop > last:
        out.append((offset + last, offset + stop, region[last:stop], True))


class StreamFilter:
    """Post-process a streamed answer chunk by chunk.

    ``flag`` returns every chunk unchanged at once. ``redact`` returns what is decided and holds
    back only a candidate (see the module docstring). With ``segments=True`` the emitted output is
    also described in ``segments`` (input positions -> text), for callers that map it back onto
    tokens (logprobs); they take the list and clear it.
    """

    def __init__(self, wl: Whitelist, mode: Mode, *, segments: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown whitelist mode {mode!r}: use one of {', '.join(MODES)}")
        self.wl = wl
        self.mode = mode
        self.findings: list[Finding] = []
        self.segments: list[Segment] | None = [] if segments else None
        self._region = ""  # the open region (its start is _offset in the whole stream)
        self._offset = 0
        self._fixed = 0  # in the open region: what precedes is decided (findings recorded)
        self._done = 0  # in the open region: what precedes is emitted (redact)
        self._splitter = _Splitter()

    @property
    def held(self) -> int:
        """Characters received and not emitted yet."""
        return len(self._region) - self._done if self.mode == "redact" else 0

    @property
    def emitted(self) -> int:
        """Stream position up to which the input has been emitted (as itself or redacted)."""
        if self.mode == "redact":
            return self._offset + self._done
        return self._offset + len(self._region)

    def feed(self, chunk: str) -> str:
        if self.mode == "off" or not chunk:
            return chunk
        buf = self._region + chunk
        cuts = self._splitter.cuts(buf, len(self._region))
        out: list[Segment] = []
        start = 0
        for cut in cuts:
            self._close(buf[start:cut], self._offset + start, out)
            start = cut
        if start:
            self._region = buf[start:]
            self._offset += start
            self._splitter.region_start -= start
        else:
            self._region = buf
        if self.mode == "flag":
            return chunk
        self._advance(out)
        return self._output(out)

    def flush(self) -> str:
        if self.mode == "off" or not self._region:
            return ""
        out: list[Segment] = []
        self._close(self._region, self._offset, out)
        self._offset += len(self._region)
        self._region = ""
        self._splitter.region_start = 0
        return "" if self.mode == "flag" else self._output(out)

    def _output(self, out: list[Segment]) -> str:
        if self.segments is not None:
            self.segments.extend(out)
        if not out:
            return ""
        return out[0][2] if len(out) == 1 else "".join(s[2] for s in out)

    def _emit(self, segments: list[Segment], out: list[Segment]) -> None:
        """Append what follows the emitted part of the open region."""
        done = self._offset + self._done
        for seg in segments:
            start, end, text, same = seg
            if end <= done:
                continue
            if start < done:  # only text kept as is can have been emitted in part
                assert same, "a redaction was emitted in part"
                seg = (done, end, text[done - start:], True)
            out.append(seg)

    def _close(self, region: str, offset: int, out: list[Segment]) -> None:
        """A region ended: everything in it is decided."""
        spans = _spans(region, self._fixed)
        if self.mode == "flag":
            if spans:
                _render(region, offset, self.wl, self.mode, spans, 0, 0, self.findings, [])
        else:
            segments: list[Segment] = []
            _render(region, offset, self.wl, self.mode, spans, self._fixed, len(region),
                    self.findings, segments)
            self._emit(segments, out)
        self._fixed = self._done = 0

    def _advance(self, out: list[Segment]) -> None:
        """Emit what no continuation of the open region can change."""
        region, fixed = self._region, self._fixed
        if _MAYBE_CANDIDATE.search(region, fixed) is None:  # plain words: all out
            word = _LIVE_LOCAL.search(region, fixed)
            if len(region) > self._done:
                out.append((self._offset + self._done, self._offset + len(region),
                            region[self._done:], True))
                self._done = len(region)
            self._fixed = word.start() if word else len(region)
            return
        candidates = _candidates(region, fixed)
        spans = _spans(region, fixed)
        # the first candidate that the scan reaches: one inside a decided match is never tried
        decided_to, j = len(region), 0
        for start, _ in candidates:
            while j < len(spans) and spans[j][4] <= start:
                j += 1
            if j < len(spans) and spans[j][1] < start:
                continue
            decided_to = start
            break
        hold = len(region)
        for start, held_from in candidates:
            if start >= decided_to and held_from < hold:
                hold = held_from
        decided = []
        for span in spans:
            if span[1] < decided_to:
                decided.append(span)
            else:
                hold = min(hold, _redaction_start(span[0], span[1], span[3]))
        if hold > self._done:
            segments: list[Segment] = []
            _render(region, self._offset, self.wl, self.mode, decided, fixed, hold, self.findings,
                    segments)
            self._emit(segments, out)
            self._done = hold
        self._fixed = decided_to  # (a decided redaction ends before ``hold``: it was emitted)


def postprocess(text: str, wl: Whitelist, mode: Mode) -> tuple[str, list[Finding]]:
    """off: ``(text, [])``; flag: ``(text, disallowed findings)``; redact: disallowed spans
    replaced by ``[unverified link removed]`` and the like (an e-mail keeps its local part)."""
    if mode == "off":
        return text, []
    stream = StreamFilter(wl, mode)
    out = stream.feed(text) + stream.flush()
    return out, stream.findings
