"""Answer post-processing with the whitelist (``pyalbert.whitelist.matcher``).

URLs, e-mails and phone numbers of an answer that are not in the whitelist are flagged or redacted
(mode ``off`` | ``flag`` | ``redact``):

- plain answers: each choice's ``message.content`` (chat) or ``text`` (completions) goes through
  ``postprocess``; in flag mode the body gets a top-level ``"albert": {"unverified": [{"kind",
  "text"}, ...]}`` (always present, possibly empty);
- streamed answers: the delta contents of each choice go through their own ``StreamFilter`` (it
  holds back only what could still become a match); text held back is released with the chunk
  that carries ``finish_reason``; in flag mode, when something is unverified, one more chunk with
  ``"choices": []`` and the ``albert`` field is sent just before ``data: [DONE]``. Events whose
  text the filter leaves unchanged are relayed as the upstream's bytes.

The matcher is imported lazily: with mode ``off`` the gateway does not need it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from pyalbert.errors import AlbertError

MODES = ("off", "flag", "redact")


def _matcher() -> ModuleType:
    try:
        from pyalbert.whitelist import matcher
    except ImportError as exc:  # pragma: no cover - the module ships with pyalbert
        raise AlbertError(f"the whitelist matcher cannot be imported ({exc}). Fix: install "
                          "pyalbert completely, or run the gateway with whitelist mode 'off'.") from None
    return matcher


def _unverified(findings: list[Any], seen: set[tuple[str, str]], out: list[dict]) -> None:
    for f in findings:
        if getattr(f, "allowed", False):
            continue
        key = (f.kind, f.text)
        if key not in seen:
            seen.add(key)
            out.append({"kind": f.kind, "text": f.text})


class Answers:
    """The whitelist and the mode of one gateway. ``header`` is ``X-Albert-Whitelist``'s value."""

    def __init__(self, mode: str, whitelist: Any = None, matcher: Any = None):
        if mode not in MODES:
            raise AlbertError(f"whitelist mode {mode!r} is not one of {', '.join(MODES)}. "
                              "Fix: set api.whitelist_mode in the environment file.")
        self.mode = mode
        self.active = mode != "off"
        self.matcher = matcher
        self.whitelist = whitelist
        entries = len(whitelist) if whitelist is not None else 0
        self.header = f"{mode}; entries={entries}".encode()
        self.version = getattr(whitelist, "version", None)

    @classmethod
    def load(cls, mode: str, path: Path | None, matcher: Any = None) -> Answers:
        if mode == "off":
            return cls("off")
        matcher = matcher or _matcher()
        if path is None:
            return cls(mode, matcher.Whitelist.empty(), matcher)
        try:
            whitelist = matcher.Whitelist.load(path)
        except AlbertError:
            raise
        except (OSError, ValueError) as exc:
            raise AlbertError(f"whitelist {path} cannot be loaded ({exc}). Fix: build it with "
                              "`albert whitelist create` or pass --whitelist FILE.") from None
        return cls(mode, whitelist, matcher)

    # -- plain answers ---------------------------------------------------------------------
    def plain(self, body: bytes, chat: bool) -> bytes | None:
        """The post-processed body, or None to relay the upstream's bytes."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list):
            return None
        changed = False
        unverified: list[dict] = []
        seen: set[tuple[str, str]] = set()
        for choice in choices:
            holder = choice.get("message") if chat else choice
            if not isinstance(holder, dict):
                continue
            field = "content" if chat else "text"
            text = holder.get(field)
            if not isinstance(text, str) or not text:
                continue
            new, findings = self.matcher.postprocess(text, self.whitelist, self.mode)
            _unverified(findings, seen, unverified)
            if new != text:
                holder[field] = new
                changed = True
        if self.mode == "flag":
            obj["albert"] = {"unverified": unverified}
        elif not changed:
            return None
        return orjson.dumps(obj)

    # -- streamed answers ------------------------------------------------------------------
    def stream(self, chat: bool) -> SseRewriter:
        return SseRewriter(self, chat)


class SseRewriter:
    """Rewrites an upstream SSE byte stream event by event; keeps a partial event for later."""

    def __init__(self, answers: Answers, chat: bool):
        self.answers = answers
        self.chat = chat
        self.filters: dict[int, Any] = {}
        self.flushed: set[int] = set()
        self.tail = b""
        self.template: dict[str, Any] = {}
        self.closed = False

    def _filter(self, index: int) -> Any:
        f = self.filters.get(index)
        if f is None:
            f = self.filters[index] = self.answers.matcher.StreamFilter(
                self.answers.whitelist, self.answers.mode)
        return f

    def feed(self, data: bytes) -> bytes:
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.tail = buf
            return b""
        self.tail = buf[end + 2:]
        out = []
        for event in buf[:end].split(b"\n\n"):
            if event:
                out.append(self._event(event))
        return b"".join(out)

    def finish(self) -> bytes:
        """At the end of the upstream stream: whatever is still held back."""
        rest = self.tail
        self.tail = b""
        out = self.feed(rest + b"\n\n") if rest.strip() else b""
        if not self.closed:
            out += self._closing()
        return out

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:"):
            return event + b"\n\n"
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return self._closing() + b"data: [DONE]\n\n"
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(obj, dict):
            return event + b"\n\n"
        if not self.template:
            self.template = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        choices = obj.get("choices")
        if not choices:
            return event + b"\n\n"
        changed = False
        for choice in choices:
            index = choice.get("index", 0)
            if self.chat:
                holder = choice.get("delta")
                if not isinstance(holder, dict):
                    holder = choice["delta"] = {}
                field = "content"
            else:
                holder, field = choice, "text"
            text = holder.get(field)
            if index in self.flushed:
                continue
            f = self._filter(index)
            out = f.feed(text) if isinstance(text, str) and text else ""
            if choice.get("finish_reason") is not None:
                out += f.flush()
                self.flushed.add(index)
            if out != (text or ""):
                holder[field] = out
                changed = True
        if not changed:
            return event + b"\n\n"
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _closing(self) -> bytes:
        """Held-back text of unfinished choices and, in flag mode, the unverified findings."""
        self.closed = True
        choices = []
        for index, f in self.filters.items():
            if index in self.flushed:
                continue
            self.flushed.add(index)
            text = f.flush()
            if text:
                holder = {"content": text} if self.chat else None
                choices.append({"index": index, "delta": holder, "finish_reason": None}
                               if self.chat else {"index": index, "text": text, "finish_reason": None})
        unverified: list[dict] = []
        if self.answers.mode == "flag":
            seen: set[tuple[str, str]] = set()
            for f in self.filters.values():
                _unverified(list(f.findings), seen, unverified)
        if not choices and not unverified:
            return b""
        chunk = dict(self.template)
        chunk["choices"] = choices
        if unverified:
            chunk["albert"] = {"unverified": unverified}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"
