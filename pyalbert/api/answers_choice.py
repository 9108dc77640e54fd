"""The texts of one choice of an answer: content (with logprobs: ``answers_logprobs``),
``reasoning``/``reasoning_content`` and tool calls' ``function.arguments`` (JSON escapes written
plainly before matching); each through its own StreamFilter. Shared by whole and streamed answers."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pyalbert.api.answers_logprobs import (
    Tokens,
    Unit,
    completion_entries,
    completion_logprobs,
    rewrite_chat_entries,
    rewrite_completion_entries,
)

if TYPE_CHECKING:
    from pyalbert.api.answers import Answers

#: texts of a chat message / delta besides the content (reasoning models)
SIDE_FIELDS = ("reasoning", "reasoning_content")


def _unverified(findings: list[Any], seen: set[tuple[str, str]], out: list[dict]) -> None:
    for f in findings:
        if getattr(f, "allowed", False):
            continue
        key = (f.kind, f.text)
        if key not in seen:
            seen.add(key)
            out.append({"kind": f.kind, "text": f.text})

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

class Choice:
    """Every text of one choice (index) of an answer."""

    __slots__ = ("answers", "chat", "flag", "content", "tokens", "side", "tools", "out_pos",
                 "offset_base", "finished")

    def __init__(self, answers: Answers, chat: bool):
        self.answers = answers
        self.chat = chat
        self.flag = answers.mode == "flag"
        self.content: _Text | None = None  # flag
        self.tokens: Tokens | None = None  # redact
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
                entries, tokens = completion_entries(logprobs)
        if not text and not entries and not (final and self.tokens is not None):
            return False
        if self.tokens is None and not entries and self.content is None:
            self.content = _Text(self.answers)
            return self._content(holder, choice, final)
        if self.content is not None:  # logprobs after text without: they say what this event says
            out = self.content.feed(text, final)
            if out != text and entries:
                (rewrite_chat_entries if self.chat else rewrite_completion_entries)(entries, out)
                if not self.chat:
                    choice["logprobs"] = completion_logprobs(entries, logprobs)
            if out != text:
                holder[field] = out
            return out != text
        self.tokens = self.tokens or Tokens(self.answers)
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
                    rewrite_chat_entries(unit_entries, piece)
                else:
                    rewrite_completion_entries(unit_entries, piece)
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
            choice["logprobs"] = completion_logprobs(released, logprobs)
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


def all_unverified(choices: list[Choice]) -> list[dict]:
    out: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for state in choices:
        for f in state.filters():
            _unverified(f.findings, seen, out)
    return out
