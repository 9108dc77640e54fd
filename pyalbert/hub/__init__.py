"""Models from the hub to the storage dir: ``download_models`` and the manifest it writes."""

from pyalbert.hub.download import DownloadPlan, ModelResult, download_models, make_plan
from pyalbert.hub.errors import (
    AccessDenied,
    ChecksumMismatch,
    DownloadsFailed,
    HubError,
    NotEnoughSpace,
    NotFoundOnHub,
    OfflineMissing,
    UnsafeFileName,
)
from pyalbert.hub.manifest import MANIFEST_NAME, Manifest, check_installed, read_manifest
from pyalbert.hub.selection import select_files

__all__ = [
    "MANIFEST_NAME",
    "AccessDenied",
    "ChecksumMismatch",
    "DownloadPlan",
    "DownloadsFailed",
    "HubError",
    "Manifest",
    "ModelResult",
    "NotEnoughSpace",
    "NotFoundOnHub",
    "OfflineMissing",
    "UnsafeFileName",
    "check_installed",
    "download_models",
    "make_plan",
    "read_manifest",
    "select_files",
]
