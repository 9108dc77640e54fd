"""Find URLs, e-mails and phone numbers in a model's answer and check them against a whitelist.

The api gateway calls :func:`postprocess` on whole answers and :class:`StreamFilter` on streamed
ones. Both cut the text into the same *regions* so that a stream, however it is chunked, yields
exactly ``postprocess(text)[0]``
(see ``pyalbert.whitelist.scanner``: regions, patterns, candidates), and the stream filter holds
back only what can still become a finding (``pyalbert.whitelist.stream_filter``). This module is
the whitelist itself (loading, verdicts, ``findings``) and ``postprocess``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
from pyalbert.whitelist.scanner import (
    KINDS,
    SHORT_NUMBER,
    Finding,
    region_pattern,
    scan_region,
    scan_regions,
)
from pyalbert.whitelist.stream_filter import Mode, StreamFilter

#: entry lists of the whitelist file, by kind of finding they allow
ENTRY_KEYS = ("urls", "domains", "emails", "phones")
FILE_FORMAT_VERSION = 1

_MISSING = object()
_NORMALIZERS = {"url": normalize_url, "email": normalize_email, "phone": normalize_phone}

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
        pattern = region_pattern(region)
        if pattern is None:
            return
        for kind, start, end, text, _ in scan_region(region, pattern):
            allowed = self._verdict(kind, text)
            if allowed is not None:
                yield Finding(kind, offset + start, offset + end, text, allowed)

    def findings(self, text: str) -> list[Finding]:
        """Every URL, e-mail and phone number in ``text``, allowed or not.

        Short numbers (``3949``) are reported only when listed: any 4-digit figure would
        otherwise be a phone number.
        """
        out: list[Finding] = []
        for start, end in scan_regions(text):
            out.extend(self._check(text[start:end], start))
        short = {p for p in self.phones if not p.startswith("+")}
        if short:
            taken = [(f.start, f.end) for f in out]
            for m in SHORT_NUMBER.finditer(text):
                if m.group() in short and not any(s < m.end() and m.start() < e for s, e in taken):
                    out.append(Finding("phone", m.start(), m.end(), m.group(), True))
            out.sort(key=lambda f: f.start)
        return out

def postprocess(text: str, wl: Whitelist, mode: Mode) -> tuple[str, list[Finding]]:
    """off: ``(text, [])``; flag: ``(text, disallowed findings)``; redact: disallowed spans
    replaced by ``[unverified link removed]`` and the like (an e-mail keeps its local part)."""
    if mode == "off":
        return text, []
    stream = StreamFilter(wl, mode)
    out = stream.feed(text) + stream.flush()
    return out, stream.findings
