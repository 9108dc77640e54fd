"""Streamed answers: the upstream's SSE bytes rewritten event by event (redact), or relayed as
they arrive and matched on the side (flag), with held-back text and the unverified findings sent
just before ``data: [DONE]``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from pyalbert.api.answers_choice import SIDE_FIELDS, Choice, all_unverified

if TYPE_CHECKING:
    from pyalbert.api.answers import Answers

_DONE_EVENTS = (b"data: [DONE]", b"data:[DONE]")


class SseRewriter:
    """Rewrites an upstream SSE byte stream event by event; keeps a partial event for later."""

    def __init__(self, answers: Answers, chat: bool):
        self.answers = answers
        self.chat = chat
        self.flag = answers.mode == "flag"
        self.choices: dict[int, Choice] = {}
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

    def _choice(self, index: int) -> Choice:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = Choice(self.answers, self.chat)
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

    def _choices(self, obj: dict) -> list[tuple[Choice, dict, dict, bool]]:
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
        unverified = all_unverified(list(self.choices.values())) if self.flag else []
        if not choices and not unverified:
            return b""
        chunk = dict(self.template)
        chunk["choices"] = choices
        if unverified:
            chunk["albert"] = {"unverified": unverified}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"
