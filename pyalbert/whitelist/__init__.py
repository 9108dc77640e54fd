"""Trusted URLs, e-mails and phone numbers: the matcher the api uses, and ``create_whitelist``."""

from pyalbert.whitelist.matcher import Whitelist, postprocess
from pyalbert.whitelist.scanner import Finding
from pyalbert.whitelist.stream_filter import REDACTIONS, Mode, StreamFilter

__all__ = ["REDACTIONS", "Finding", "Mode", "StreamFilter", "Whitelist", "postprocess"]
