"""Structured access logs: one JSON object per line, never a prompt, an answer or a key."""

from __future__ import annotations

import sys
from typing import BinaryIO

import orjson


class AccessLog:
    """Buffered JSON lines; :meth:`flush` runs about every second (and at shutdown)."""

    def __init__(self, stream: BinaryIO | None = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.enabled = enabled
        self.pending: list[bytes] = []

    def write(self, record: dict) -> None:
        if self.enabled:
            self.pending.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            if len(self.pending) >= 256:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass
