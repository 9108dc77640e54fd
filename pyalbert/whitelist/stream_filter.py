"""Post-process a streamed answer chunk by chunk (``StreamFilter``), redacting or flagging what
the whitelist does not allow.

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

from typing import TYPE_CHECKING, Literal

from pyalbert.whitelist.scanner import (
    LIVE_LOCAL,
    MAYBE_CANDIDATE,
    Finding,
    Span,
    Splitter,
    pending_candidates,
    region_spans,
)

if TYPE_CHECKING:
    from pyalbert.whitelist.matcher import Whitelist

Mode = Literal["off", "flag", "redact"]
MODES: tuple[Mode, ...] = ("off", "flag", "redact")

REDACTIONS: dict[str, str] = {
    "url": "[unverified link removed]",
    "email": "[unverified e-mail domain removed]",
    "phone": "[unverified phone number removed]",
}

#: a piece of output: the stream positions [start, end) of the input it stands for, its text, and
#: whether that text is the input itself (else a redaction)
Segment = tuple[int, int, str, bool]


def _redaction_start(kind: str, start: int, text: str) -> int:
    """Where a redaction begins: an e-mail keeps its local part and its ``@``."""
    return start + text.index("@") + 1 if kind == "email" else start


def _render(region: str, offset: int, wl: Whitelist, mode: Mode, spans: list[Span], start: int,
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
        self._splitter = Splitter()

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
        spans = region_spans(region, self._fixed)
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
        if MAYBE_CANDIDATE.search(region, fixed) is None:  # plain words: all out
            word = LIVE_LOCAL.search(region, fixed)
            if len(region) > self._done:
                out.append((self._offset + self._done, self._offset + len(region),
                            region[self._done:], True))
                self._done = len(region)
            self._fixed = word.start() if word else len(region)
            return
        candidates = pending_candidates(region, fixed)
        spans = region_spans(region, fixed)
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
