"""Errors of the model download: each one paragraph naming the model, the path and the fix."""

from __future__ import annotations

from pyalbert.errors import AlbertError


class HubError(AlbertError):
    """A model could not be fetched or installed; nothing half-installed was left in place."""

    exit_code = 4


class AccessDenied(HubError):
    """401/403: gated or private repo, missing or insufficient token."""


class NotFoundOnHub(HubError):
    """404: the repo, the revision or a file does not exist."""


class ChecksumMismatch(HubError):
    """A downloaded file differs from what the hub metadata announced."""


class UnsafeFileName(HubError):
    """The hub listed a file whose name would land outside the model folder."""


class NotEnoughSpace(HubError):
    """The storage dir cannot hold what is about to be downloaded."""


class OfflineMissing(HubError):
    """``HF_HUB_OFFLINE=1`` and the model is not complete on disk."""


class DownloadsFailed(HubError):
    """Some models failed. ``results``: every model's outcome; ``errors``: the failures' errors."""

    def __init__(self, message: str, results: list, errors: list[HubError]):
        super().__init__(message)
        self.results = results
        self.errors = errors
