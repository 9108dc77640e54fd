"""The content of a choice with ``logprobs``: re-cut on token boundaries (a token goes out once
all its characters are decided), and the logprob entries of tokens under a redaction rewritten
(chat ``token``/``bytes``/``top_logprobs``; completions' columns)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyalbert.api.answers import Answers

#: a released piece of content: (output text, input text, logprob entries or None)
Unit = tuple[str, str, "list[Any] | None"]


class Tokens:
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


def rewrite_chat_entries(entries: list[Any], piece: str) -> None:
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


def completion_entries(logprobs: dict) -> tuple[list | None, list | None]:
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


def rewrite_completion_entries(entries: list[dict], piece: str) -> None:
    for k, entry in enumerate(entries):
        token = piece if k == 0 else ""
        entry["token"] = token
        if isinstance(entry["top"], dict):
            entry["top"] = {token: entry["logprob"]} if token else {}


def completion_logprobs(entries: list[dict], original: Any) -> dict:
    out = dict(original) if isinstance(original, dict) else {}
    out.update({"text_offset": [e["offset"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "tokens": [e["token"] for e in entries],
                "top_logprobs": [e["top"] for e in entries]})
    return out
