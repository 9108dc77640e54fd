"""Answer post-processing with the whitelist (``pyalbert.whitelist.matcher``).

URLs, e-mails and phone numbers of an answer that are not in the whitelist are flagged or redacted
(mode ``off`` | ``flag`` | ``redact``). The texts of an answer are, for every choice: the content
(chat ``message.content`` / ``delta.content``, completions ``text``), ``reasoning`` /
``reasoning_content`` and each tool call's ``function.arguments``; with ``logprobs``, the token
strings (``token``, ``bytes``, ``top_logprobs``; completions ``tokens`` and ``top_logprobs``) say
the same as the content they belong to.

- plain answers: each text goes through ``postprocess``; in flag mode the body gets a top-level
  ``"albert": {"unverified": [{"kind", "text"}, ...]}`` (always present, possibly empty);
- streamed answers, flag: the upstream's bytes are relayed as they arrive, untouched; the events
  are matched on the side, and when something is unverified one more chunk with
  ``"choices": []`` and the ``albert`` field is sent just before ``data: [DONE]``;
- streamed answers, redact: every text of every choice (``n > 1``) has its own ``StreamFilter``,
  which holds back only a candidate (what can still become a URL, e-mail or phone number). The
  content is re-cut on token boundaries when ``logprobs`` come with it: a token goes out with its
  logprob entry once all its characters are decided, and a token under a redaction carries the
  redaction (the first one) or nothing, in ``token``, ``bytes`` and every ``top_logprobs`` entry.
  Text held back is released with the chunk that carries ``finish_reason``. Events whose texts
  come out unchanged are relayed as the upstream's bytes.

The matcher is imported lazily: with mode ``off`` the gateway does not need it.
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from pyalbert.errors import AlbertError

MODES = ("off", "flag", "redact")
#: texts of a chat message / delta besides the content (reasoning models)
SIDE_FIELDS = ("reasoning", "reasoning_content")
_DONE_EVENTS = (b"data: [DONE]", b"data:[DONE]")


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

    def _filter(self, segments: bool = False) -> Any:
        return self.matcher.StreamFilter(self.whitelist, self.mode, segments=segments)

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
        states = []
        changed = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            state = _Choice(self, chat)
            holder = choice.get("message") if chat else choice
            if isinstance(holder, dict):
                changed |= state.rewrite(holder, choice, final=True)
            states.append(state)
        if self.mode == "flag":
            obj["albert"] = {"unverified": _all_unverified(states)}
        elif not changed:
            return None
        return orjson.dumps(obj)

    # -- streamed answers ------------------------------------------------------------------
    def stream(self, chat: bool) -> SseRewriter:
        return SseRewriter(self, chat)


class _Text:
    """One text of a choice through its own StreamFilter."""

    __slots__ = ("filter",)

    def __init__(self, answers: Answers):
        self.filter = answers._filter()

    def feed(self, text: str, final: bool) -> str:
        out = self.filter.feed(text) if text else ""
        return out + self.filter.flush() if final else out


_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?\Z|\\(?:/|u([0-9a-fA-F]{4})|.)", re.DOTALL)


class _Arguments(_Text):
    """Tool-call arguments: JSON text, where ``https:\\/\\/`` or ``\\u0040`` spell what a
    tool will read as ``https://`` and ``@``. Such escapes (``\\/``, and ``\\uXXXX`` of a
    printable ASCII character other than ``"`` and ``\\``) are written plainly before matching
    (the same JSON value); an escape cut by the chunking waits for its end."""

    __slots__ = ("carry",)

    def __init__(self, answers: Answers):
        super().__init__(answers)
        self.carry = ""

    def feed(self, text: str, final: bool) -> str:
        return super().feed(self.unescape(text, final), final)

    def unescape(self, text: str, final: bool) -> str:
        text, self.carry = self.carry + text, ""
        if "\\" not in text:
            return text

        def plain(m: re.Match[str]) -> str:
            escape = m.group()
            if m.end() == len(text) and (escape == "\\" or (escape[:2] == "\\u" and len(escape) < 6)):
                if not final:
                    self.carry = escape
                    return ""
                return escape
            if escape == "\\/":
                return "/"
            code = m.group(1)
            if code is not None:
                char = chr(int(code, 16))
                if " " <= char <= "~" and char not in "\"\\":
                    return char
            return escape

        return _ESCAPE.sub(plain, text)


#: a released piece of content: (output text, input text, logprob entries or None)
Unit = tuple[str, str, "list[Any] | None"]


class _Tokens:
    """The content of a choice, re-cut on token boundaries so that its logprobs match it.

    ``units`` are [start, end, text, entries] in input positions: a token with its logprob entry
    (released once all its characters are emitted), or text without entries (released as far as
    it is emitted). ``segments`` come from the StreamFilter: input ranges and what they became.
    """

    __slots__ = ("filter", "units", "segments", "fed")

    def __init__(self, answers: Answers):
        self.filter = answers._filter(segments=True)
        self.units: deque[list] = deque()
        self.segments: deque[tuple[int, int, str, bool]] = deque()
        self.fed = 0

    def feed(self, text: str, entries: list[Any] | None, tokens: list[str] | None,
             final: bool) -> list[Unit]:
        start = self.fed
        if entries and tokens is not None and "".join(tokens) == text:
            at = 0
            for token, entry in zip(tokens, entries, strict=True):
                self.units.append([start + at, start + at + len(token), token, [entry]])
                at += len(token)
        elif entries:  # tokens that do not spell the text (end of sequence): one unit
            self.units.append([start, start + len(text), text, list(entries)])
        elif text:
            self.units.append([start, start + len(text), text, None])
        self.fed += len(text)
        if text:
            self.filter.feed(text)
        if final:
            self.filter.flush()
        if self.filter.segments:
            self.segments.extend(self.filter.segments)
            self.filter.segments.clear()
        return self._release()

    def _release(self) -> list[Unit]:
        emitted = self.filter.emitted
        units, segments = self.units, self.segments
        out: list[Unit] = []
        while units:
            start, end, text, entries = units[0]
            if end <= emitted:
                units.popleft()
            elif entries is not None or start >= emitted:
                break
            else:  # text without entries goes out as far as it is emitted
                cut = emitted - start
                units[0] = [emitted, end, text[cut:], None]
                end, text = emitted, text[:cut]
            pieces = []
            for seg_start, seg_end, seg_text, same in segments:
                if seg_start >= end:
                    break
                if same:
                    if seg_end > start:
                        pieces.append(seg_text[max(start, seg_start) - seg_start:min(end, seg_end) - seg_start])
                elif seg_start >= start:
                    pieces.append(seg_text)  # a redaction goes with the token it starts in
            while segments and segments[0][1] <= end:
                segments.popleft()
            out.append(("".join(pieces), text, entries))
        return out


def _rewrite_chat_entries(entries: list[Any], piece: str) -> None:
    """Logprob entries of a unit that came out as ``piece`` rather than as itself."""
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        token = piece if k == 0 else ""
        data = list(token.encode())
        entry["token"] = token
        if "bytes" in entry:
            entry["bytes"] = data
        for alt in entry.get("top_logprobs") or ():
            if isinstance(alt, dict):
                alt["token"] = token
                if "bytes" in alt:
                    alt["bytes"] = data


def _completion_entries(logprobs: dict) -> tuple[list | None, list | None]:
    """Completions logprobs (columns) as one dict per token."""
    tokens = logprobs.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return None, None
    n = len(tokens)

    def column(name: str) -> list:
        value = logprobs.get(name)
        return value if isinstance(value, list) and len(value) == n else [None] * n

    entries = [{"token": t, "logprob": lp, "top": top, "offset": off}
               for t, lp, top, off in zip(tokens, column("token_logprobs"), column("top_logprobs"),
                                          column("text_offset"), strict=True)]
    return entries, tokens


def _rewrite_completion_entries(entries: list[dict], piece: str) -> None:
    for k, entry in enumerate(entries):
        token = piece if k == 0 else ""
        entry["token"] = token
        if isinstance(entry["top"], dict):
            entry["top"] = {token: entry["logprob"]} if token else {}


def _completion_logprobs(entries: list[dict], original: Any) -> dict:
    out = dict(original) if isinstance(original, dict) else {}
    out.update({"text_offset": [e["offset"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "tokens": [e["token"] for e in entries],
                "top_logprobs": [e["top"] for e in entries]})
    return out


class _Choice:
    """Every text of one choice (index) of an answer."""

    __slots__ = ("answers", "chat", "flag", "content", "tokens", "side", "tools", "out_pos",
                 "offset_base", "finished")

    def __init__(self, answers: Answers, chat: bool):
        self.answers = answers
        self.chat = chat
        self.flag = answers.mode == "flag"
        self.content: _Text | None = None  # flag
        self.tokens: _Tokens | None = None  # redact
        self.side: dict[str, _Text] = {}
        self.tools: dict[int, _Arguments] = {}
        self.out_pos = 0  # characters of content sent (completions ``text_offset``)
        self.offset_base: int | None = None
        self.finished = False

    def filters(self) -> list[Any]:
        out = [t.filter for t in (self.content, self.tokens) if t is not None]
        return out + [t.filter for t in self.side.values()] + [t.filter for t in self.tools.values()]

    def rewrite(self, holder: dict, choice: dict, final: bool) -> bool:
        """Rewrite the texts of ``holder`` (message, delta or completion choice) in place;
        ``final``: the choice ends here, release everything."""
        changed = self._content(holder, choice, final)
        if self.chat:
            for field in SIDE_FIELDS:
                text = holder.get(field)
                text = text if isinstance(text, str) else ""
                if not text and not (final and field in self.side):
                    continue
                state = self.side.get(field) or self.side.setdefault(field, _Text(self.answers))
                out = state.feed(text, final)
                if out != text:
                    holder[field] = out
                    changed = True
            changed |= self._tools(holder, final)
        if final:
            self.finished = True
        return changed and not self.flag

    def _content(self, holder: dict, choice: dict, final: bool) -> bool:
        field = "content" if self.chat else "text"
        text = holder.get(field)
        text = text if isinstance(text, str) else ""
        logprobs = choice.get("logprobs")
        if self.flag or (self.content is not None and not logprobs):
            # flag matches on the side; an answer without logprobs needs no token boundaries
            if text or (final and self.content is not None):
                self.content = self.content or _Text(self.answers)
                out = self.content.feed(text, final)
                if out != text and not self.flag:
                    holder[field] = out
                    return True
            return False
        entries = tokens = None
        if isinstance(logprobs, dict):
            if self.chat:
                entries = logprobs.get("content")
                if isinstance(entries, list):
                    tokens = [e.get("token") if isinstance(e, dict) else None for e in entries]
                    if not all(isinstance(t, str) for t in tokens):
                        tokens = None
                else:
                    entries = None
            else:
                entries, tokens = _completion_entries(logprobs)
        if not text and not entries and not (final and self.tokens is not None):
            return False
        if self.tokens is None and not entries and self.content is None:
            self.content = _Text(self.answers)
            return self._content(holder, choice, final)
        if self.content is not None:  # logprobs after text without: they say what this event says
            out = self.content.feed(text, final)
            if out != text and entries:
                (_rewrite_chat_entries if self.chat else _rewrite_completion_entries)(entries, out)
                if not self.chat:
                    choice["logprobs"] = _completion_logprobs(entries, logprobs)
            if out != text:
                holder[field] = out
            return out != text
        self.tokens = self.tokens or _Tokens(self.answers)
        units = self.tokens.feed(text, entries, tokens, final)
        out = "".join(u[0] for u in units)
        changed = out != text
        released = []
        for piece, original, unit_entries in units:
            if unit_entries is None:
                continue
            if piece != original:
                changed = True
                if self.chat:
                    _rewrite_chat_entries(unit_entries, piece)
                else:
                    _rewrite_completion_entries(unit_entries, piece)
            released.extend(unit_entries)
        if entries is not None and len(released) != len(entries):
            changed = True
        if not self.chat and released:
            changed |= self._offsets(units)
        self.out_pos += len(out)
        if not changed:
            return False
        if field in holder or out:
            holder[field] = out
        if self.chat:
            if isinstance(logprobs, dict):
                logprobs["content"] = released
            elif released:
                choice["logprobs"] = {"content": released}
        elif entries is not None or released:
            choice["logprobs"] = _completion_logprobs(released, logprobs)
        return True

    def _offsets(self, units: list[Unit]) -> bool:
        """Completions ``text_offset``: positions in the text the client gets."""
        changed = False
        pos = self.out_pos
        for piece, _, unit_entries in units:
            for k, entry in enumerate(unit_entries or ()):
                at = pos if k == 0 else pos + len(piece)
                if self.offset_base is None:
                    offset = entry["offset"]
                    self.offset_base = offset - at if isinstance(offset, int) else 0
                if entry["offset"] != self.offset_base + at:
                    entry["offset"] = self.offset_base + at
                    changed = True
            pos += len(piece)
        return changed

    def _tools(self, holder: dict, final: bool) -> bool:
        changed = False
        calls = holder.get("tool_calls")
        seen = set()
        for position, call in enumerate(calls if isinstance(calls, list) else ()):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            index = call.get("index", position)
            seen.add(index)
            args = function.get("arguments")
            args = args if isinstance(args, str) else ""
            if not args and not (final and index in self.tools):
                continue
            state = self.tools.get(index) or self.tools.setdefault(index, _Arguments(self.answers))
            out = state.feed(args, final)
            if out != args:
                function["arguments"] = out
                changed = True
        if final:  # held arguments of calls this event does not mention
            for index, state in self.tools.items():
                rest = state.feed("", True) if index not in seen else ""
                if rest:
                    if not isinstance(calls, list):
                        calls = holder["tool_calls"] = []
                    calls.append({"index": index, "function": {"arguments": rest}})
                    changed = True
        return changed


def _all_unverified(choices: list[_Choice]) -> list[dict]:
    out: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for state in choices:
        for f in state.filters():
            _unverified(f.findings, seen, out)
    return out


class SseRewriter:
    """Rewrites an upstream SSE byte stream event by event; keeps a partial event for later."""

    def __init__(self, answers: Answers, chat: bool):
        self.answers = answers
        self.chat = chat
        self.flag = answers.mode == "flag"
        self.choices: dict[int, _Choice] = {}
        self.tail = b""
        self.unsent = 0  # flag: bytes at the end of ``tail`` not relayed yet
        self.template: dict[str, Any] = {}
        self.closed = False

    def feed(self, data: bytes) -> bytes:
        if self.flag:
            return self._feed_flag(data)
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

    def _feed_flag(self, data: bytes) -> bytes:
        """Relay every byte at once; only the start of what may be ``[DONE]`` waits (its event
        must come first)."""
        buf = self.tail + data if self.tail else data
        pos = len(self.tail) - self.unsent  # relayed already
        end = buf.rfind(b"\n\n")
        out = []
        if end >= 0:
            start = 0
            for event in buf[:end].split(b"\n\n"):
                if event.strip() in _DONE_EVENTS:
                    out.append(buf[pos:start])
                    out.append(self._closing())
                    pos = start
                elif event:
                    self._observe(event)
                start += len(event) + 2
            self.tail = buf[end + 2:]
        else:
            self.tail = buf
        tail = self.tail
        if tail and any(d.startswith(tail.strip()) or tail.startswith(d) for d in _DONE_EVENTS):
            self.unsent = len(tail)
            out.append(buf[pos:len(buf) - len(tail)])
        else:
            self.unsent = 0
            out.append(buf[pos:])
        return b"".join(out)

    def finish(self) -> bytes:
        """At the end of the upstream stream: whatever is still held back."""
        rest, unsent = self.tail, self.unsent
        self.tail, self.unsent = b"", 0
        if self.flag:
            out = b""
            if rest.strip() in _DONE_EVENTS:
                out = (self._closing() if not self.closed else b"") + rest + b"\n\n"
            elif rest.strip():  # an event the upstream did not end: end it
                self._observe(rest.strip())
                out = rest[len(rest) - unsent:] + b"\n\n"
            return out + (self._closing() if not self.closed else b"")
        out = self.feed(rest + b"\n\n") if rest.strip() else b""
        if not self.closed:
            out += self._closing()
        return out

    def _choice(self, index: int) -> _Choice:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _Choice(self.answers, self.chat)
        return state

    def _parse(self, event: bytes) -> dict | None:
        if not event.startswith(b"data:"):
            return None
        try:
            obj = orjson.loads(event[5:])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        if not self.template:
            self.template = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        return obj

    def _choices(self, obj: dict) -> list[tuple[_Choice, dict, dict, bool]]:
        choices = obj.get("choices")
        out = []
        if not isinstance(choices, list):
            return out
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if self.chat:
                holder = choice.get("delta")
                if not isinstance(holder, dict):
                    holder = choice["delta"] = {}
            else:
                holder = choice
            out.append((self._choice(index if isinstance(index, int) else 0), holder, choice,
                        choice.get("finish_reason") is not None))
        return out

    def _observe(self, event: bytes) -> None:
        """flag: match the texts of an event on the side."""
        obj = self._parse(event)
        if obj is not None:
            for state, holder, choice, final in self._choices(obj):
                state.rewrite(holder, choice, final)

    def _event(self, event: bytes) -> bytes:
        stripped = event.strip()
        if stripped in _DONE_EVENTS:
            return self._closing() + b"data: [DONE]\n\n"
        obj = self._parse(stripped)
        if obj is None:
            return event + b"\n\n"
        changed = False
        for state, holder, choice, final in self._choices(obj):
            changed |= state.rewrite(holder, choice, final)
        if not changed:
            return event + b"\n\n"
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _closing(self) -> bytes:
        """Held-back text of unfinished choices and, in flag mode, the unverified findings."""
        self.closed = True
        choices = []
        for index, state in self.choices.items():
            if state.finished:
                continue
            if self.chat:
                holder: dict[str, Any] = {}
                choice: dict[str, Any] = {"index": index, "delta": holder, "logprobs": None,
                                          "finish_reason": None}
            else:
                holder = choice = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
            if state.rewrite(holder, choice, final=True) and (
                    any(holder.get(k) for k in ("content", "text", "tool_calls", *SIDE_FIELDS))
                    or choice["logprobs"]):
                choices.append(choice)
        unverified = _all_unverified(list(self.choices.values())) if self.flag else []
        if not choices and not unverified:
            return b""
        chunk = dict(self.template)
        chunk["choices"] = choices
        if unverified:
            chunk["albert"] = {"unverified": unverified}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"
