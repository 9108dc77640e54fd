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

Modules: this one (the mode, the whitelist, whole answers), ``answers_stream`` (SSE streams),
``answers_choice`` (the texts of one choice: content, reasoning, tool-call arguments),
``answers_logprobs`` (content re-cut on token boundaries, logprob entries rewritten).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from pyalbert.api.answers_choice import Choice, all_unverified
from pyalbert.api.answers_stream import SseRewriter
from pyalbert.errors import AlbertError

MODES = ("off", "flag", "redact")


def _matcher() -> ModuleType:
    try:
        from pyalbert.whitelist import matcher
    except ImportError as exc:  # pragma: no cover - the module ships with pyalbert
        raise AlbertError(f"the whitelist matcher cannot be imported ({exc}). Fix: install "
                          "pyalbert completely, or run the gateway with whitelist mode 'off'.") from None
    return matcher

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
            state = Choice(self, chat)
            holder = choice.get("message") if chat else choice
            if isinstance(holder, dict):
                changed |= state.rewrite(holder, choice, final=True)
            states.append(state)
        if self.mode == "flag":
            obj["albert"] = {"unverified": all_unverified(states)}
        elif not changed:
            return None
        return orjson.dumps(obj)

    # -- streamed answers ------------------------------------------------------------------
    def stream(self, chat: bool) -> SseRewriter:
        return SseRewriter(self, chat)
