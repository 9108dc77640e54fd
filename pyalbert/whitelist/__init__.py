"""Trusted URLs, e-mails and phone numbers: the matcher the api uses, and ``create_whitelist``."""

from pyalbert.whitelist.matcher import (
    REDACTIONS,
    Finding,
    Mode,
    StreamFilter,
    Whitelist,
    postprocess,
)

__all__ = ["REDACTIONS", "Finding", "Mode", "StreamFilter", "Whitelist", "postprocess"]
