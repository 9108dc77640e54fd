"""``create_whitelist``: gather trusted URLs, domains, e-mails and phones into one JSON file.

Sources are local files or folders (JSON, JSONL, Markdown, HTML, text; relative to the config
folder) or http(s) URLs. Everything is read first; the file is written only if every source was
read, through a temporary file renamed over the old one. The output is deterministic (sorted,
no timestamps), so the same inputs give a byte-identical file and the run says "unchanged".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import httpx

from pyalbert.config.environment import WhitelistSpec
from pyalbert.errors import AlbertError, ConfigError, Problem
from pyalbert.whitelist.matcher import ENTRY_KEYS, FILE_FORMAT_VERSION, Whitelist
from pyalbert.whitelist.normalize import (
    normalize_domain,
    normalize_email,
    normalize_phone,
    normalize_url,
)

#: files a source folder contributes; other files in it are skipped
SOURCE_SUFFIXES = (".json", ".jsonl", ".md", ".markdown", ".html", ".htm", ".txt")
NORMALIZERS = {
    "urls": normalize_url,
    "domains": normalize_domain,
    "emails": normalize_email,
    "phones": normalize_phone,
}
_FINDING_KEY = {"url": "urls", "email": "emails", "phone": "phones"}
_SCANNER = Whitelist.empty()


@dataclass
class Entries:
    urls: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    emails: set[str] = field(default_factory=set)
    phones: set[str] = field(default_factory=set)

    def add(self, key: str, value: str) -> bool:
        normalized = NORMALIZERS[key](value)
        if normalized:
            getattr(self, key).add(normalized)
        return normalized is not None

    def update(self, other: Entries) -> None:
        for key in ENTRY_KEYS:
            getattr(self, key).update(getattr(other, key))

    def sorted(self) -> dict[str, list[str]]:
        return {key: sorted(getattr(self, key)) for key in ENTRY_KEYS}


@dataclass(frozen=True)
class SourceDocument:
    """One file or page read from a source: its name in the output and its bytes."""

    name: str
    data: bytes
    kind: str  # json, jsonl, html, text


@dataclass(frozen=True)
class BuildResult:
    path: Path
    document: dict
    changed: bool

    @property
    def version(self) -> str:
        return hashlib.sha256(render(self.document)).hexdigest()[:12]


# --- reading sources ------------------------------------------------------------------------


def _kind_of(name: str, content_type: str = "") -> str:
    content_type = content_type.split(";")[0].strip().lower()
    if content_type in ("text/html", "application/xhtml+xml"):
        return "html"
    if content_type in ("application/json",):
        return "json"
    suffix = PurePosixPath(name).suffix.lower()
    return {".json": "json", ".jsonl": "jsonl", ".html": "html", ".htm": "html"}.get(suffix, "text")


def read_sources(
    sources: tuple[str, ...] | list[str], config_dir: Path, client: httpx.Client
) -> Iterator[SourceDocument]:
    for source in sources:
        if source.startswith(("http://", "https://")):
            yield _fetch(source, client)
        else:
            yield from _read_local(source, config_dir)


def _fetch(url: str, client: httpx.Client) -> SourceDocument:
    fix = "check the URL in whitelist.sources, or copy the page into the config folder"
    try:
        response = client.get(url)
    except httpx.HTTPError as exc:
        raise AlbertError(
            f"whitelist source {url} cannot be fetched ({type(exc).__name__}: {exc}). "
            f"Nothing was written. Fix: {fix}."
        ) from None
    if response.status_code != 200:
        raise AlbertError(
            f"whitelist source {url} answered HTTP {response.status_code} "
            f"{response.reason_phrase}. Nothing was written. Fix: {fix}."
        )
    return SourceDocument(url, response.content, _kind_of(urlsplit(url).path,
                                                          response.headers.get("content-type", "")))


def _read_local(source: str, config_dir: Path) -> Iterator[SourceDocument]:
    path = Path(source) if Path(source).is_absolute() else config_dir / source
    fix = f"correct whitelist.sources (paths are relative to {config_dir})"
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise AlbertError(
                f"whitelist source folder {path} holds no {'/'.join(SOURCE_SUFFIXES)} file. "
                f"Nothing was written. Fix: add files there or {fix}."
            )
    else:
        files = [path]
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise AlbertError(
                f"whitelist source {file} cannot be read ({exc.strerror}). "
                f"Nothing was written. Fix: {fix}."
            ) from None
        yield SourceDocument(_source_name(file, config_dir), data, _kind_of(file.name))


def _source_name(path: Path, config_dir: Path) -> str:
    """Relative to the config folder when inside it, so the file does not depend on the checkout."""
    try:
        return path.resolve().relative_to(config_dir.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


# --- extracting entries ---------------------------------------------------------------------


class _HtmlText(HTMLParser):
    """Visible text plus ``href`` targets (``mailto:``/``tel:`` included)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.links: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        for name, value in attrs:
            if name == "href" and value:
                self.links.append(value.strip())
        self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _scan_text(text: str, entries: Entries) -> None:
    for finding in _SCANNER.findings(text):
        entries.add(_FINDING_KEY[finding.kind], finding.text)


def _add_link(link: str, entries: Entries) -> None:
    lower = link.lower()
    if lower.startswith("mailto:"):
        entries.add("emails", unquote(link))
    elif lower.startswith("tel:"):
        entries.add("phones", unquote(link))
    elif lower.startswith(("http://", "https://")):
        entries.add("urls", link)


def _walk_json(value: object, entries: Entries, name: str, top: bool = True) -> None:
    """Strings are scanned; a top-level ``urls``/``domains``/``emails``/``phones`` list is taken
    as explicit entries, each of which must be valid."""
    if isinstance(value, dict):
        for key, item in value.items():
            if top and key in ENTRY_KEYS and isinstance(item, list):
                for raw in item:
                    if not isinstance(raw, str) or not entries.add(key, raw):
                        raise AlbertError(
                            f"whitelist source {name}: {raw!r} under '{key}' is not a valid "
                            f"{key[:-1]}. Nothing was written. Fix: correct or remove it."
                        )
            else:
                _walk_json(item, entries, name, top=False)
    elif isinstance(value, list):
        for item in value:
            _walk_json(item, entries, name, top=False)
    elif isinstance(value, str):
        _scan_text(value, entries)


def extract(doc: SourceDocument) -> Entries:
    entries = Entries()
    try:
        text = doc.data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AlbertError(
            f"whitelist source {doc.name} is not UTF-8 text ({exc.reason} at byte {exc.start}). "
            "Nothing was written. Fix: convert it to UTF-8 or remove it from whitelist.sources."
        ) from None
    if doc.kind == "html":
        parser = _HtmlText()
        parser.feed(text)
        parser.close()
        for link in parser.links:
            _add_link(link, entries)
        _scan_text("".join(parser.parts), entries)
    elif doc.kind in ("json", "jsonl"):
        lines = [(1, text)] if doc.kind == "json" else [
            (n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
        for number, chunk in lines:
            try:
                data = json.loads(chunk)
            except json.JSONDecodeError as exc:
                line = exc.lineno if doc.kind == "json" else number
                raise AlbertError(
                    f"whitelist source {doc.name} has malformed JSON at line {line}: {exc.msg}. "
                    "Nothing was written. Fix: correct the syntax there."
                ) from None
            _walk_json(data, entries, doc.name)
    else:
        _scan_text(text, entries)
    return entries


# --- the document ---------------------------------------------------------------------------


def allowed_in_config(spec: WhitelistSpec, env_file: str) -> Entries:
    """The ``allow_*`` lists of the environment, each entry checked."""
    entries, problems = Entries(), []
    for key in ENTRY_KEYS:
        for i, raw in enumerate(getattr(spec, f"allow_{key}")):
            if not entries.add(key, raw):
                problems.append(Problem(env_file, f"whitelist.allow_{key}[{i}]",
                                        f"{raw!r} is not a valid {key[:-1]}",
                                        _FIXES[key]))
    if problems:
        raise ConfigError(problems)
    return entries


_FIXES = {
    "urls": "write a full http(s) URL, e.g. 'https://www.service-public.fr/particuliers'",
    "domains": "write a host name, e.g. 'service-public.fr' (sub-domains are included)",
    "emails": "write an address, e.g. 'contact@example.gouv.fr'",
    "phones": "write a number, e.g. '+33 1 23 45 67 89', '01 23 45 67 89' or a short number '3939'",
}


def build_document(
    spec: WhitelistSpec, config_dir: Path, env_file: str = "environment file",
    client: httpx.Client | None = None,
) -> dict:
    """Read every source and return the whitelist document (raises before anything is written)."""
    entries = allowed_in_config(spec, env_file)
    sources = []
    owned = client is None
    client = client or httpx.Client(timeout=30, follow_redirects=True)
    try:
        for doc in read_sources(spec.sources, config_dir, client):
            entries.update(extract(doc))
            sources.append({"source": doc.name, "sha256": hashlib.sha256(doc.data).hexdigest()})
    finally:
        if owned:
            client.close()
    listed = entries.sorted()
    return {
        "version": FILE_FORMAT_VERSION,
        "entries": listed,
        "counts": {key: len(values) for key, values in listed.items()},
        "sources": sources,
    }


def render(document: dict) -> bytes:
    return (json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode()


def write_atomically(path: Path, content: bytes) -> bool:
    """Write through a temporary file renamed over ``path``; ``False`` if it already held ``content``."""
    try:
        if path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise AlbertError(f"whitelist output {path} cannot be read ({exc.strerror}). "
                          "Fix: check its permissions or pass --output FILE.") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise AlbertError(f"whitelist output folder {path.parent} is not writable ({exc.strerror}). "
                          "Fix: create it with write permission or pass --output FILE.") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def create_whitelist(
    spec: WhitelistSpec, config_dir: Path, output: Path | None = None, *,
    env_file: str = "environment file", client: httpx.Client | None = None,
) -> BuildResult:
    """Build and write the whitelist; ``output`` defaults to ``whitelist.output`` in the config folder."""
    document = build_document(spec, config_dir, env_file, client)
    path = output or (config_dir / spec.output)
    changed = write_atomically(path, render(document))
    return BuildResult(path=path, document=document, changed=changed)
