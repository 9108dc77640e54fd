"""Canonical forms of URLs, domains, e-mails and phone numbers.

Both sides of a comparison go through these functions: the entries written by
``albert create_whitelist`` and the spans found in a model's answer. Each returns ``None`` for
something that is not a valid value of its kind.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
TRACKING_PARAMS = frozenset({"fbclid", "gclid", "dclid", "msclkid", "mc_eid", "igshid"})

_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)[a-z0-9\u00a1-\uffff](?:[a-z0-9\u00a1-\uffff-]{0,61}[a-z0-9\u00a1-\uffff])?"
    r"(?:\.[a-z0-9\u00a1-\uffff](?:[a-z0-9\u00a1-\uffff-]{0,61}[a-z0-9\u00a1-\uffff])?)+$"
)
_EMAIL_RE = re.compile(r"^[\w.%+-]+@([^@\s]+)$")
_NOT_DIGIT = re.compile(r"[^0-9]")


def is_tracking_param(name: str) -> bool:
    name = name.lower()
    return name.startswith("utm_") or name in TRACKING_PARAMS


def normalize_domain(raw: str) -> str | None:
    """``WWW.Service-Public.FR.`` -> ``service-public.fr`` (a leading ``www.`` or ``*.`` is dropped)."""
    text = raw.strip().lower()
    if "://" in text:
        text = urlsplit(text).hostname or ""
    text = text.rstrip(".")
    for prefix in ("*.", "www."):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text if _DOMAIN_RE.match(text) else None


def normalize_url(raw: str) -> str | None:
    """Scheme and host lower-case, default port, fragment and tracking parameters dropped,
    query sorted, trailing slash removed (the root path is ``/``); bare ``www.`` gets ``https``.
    """
    text = raw.strip()
    if text.lower().startswith("www."):
        text = "https://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return None
    host = normalize_host(parts.hostname or "")
    if host is None:
        return None
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = parts.path.rstrip("/") or "/"
    query = sorted(
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not is_tracking_param(k)
    )
    return urlunsplit((scheme, netloc, path, urlencode(query), ""))


def normalize_host(raw: str) -> str | None:
    host = raw.lower().rstrip(".")
    return host if _DOMAIN_RE.match(host) or host == "localhost" else None


def url_host(normalized_url: str) -> str:
    return urlsplit(normalized_url).hostname or ""


def url_key(normalized_url: str) -> str:
    """What two URLs must share to be the same page: everything but the scheme."""
    return normalized_url.split("://", 1)[-1]


def normalize_email(raw: str) -> str | None:
    text = raw.strip().lower()
    if text.startswith("mailto:"):
        text = text[len("mailto:"):].split("?", 1)[0]
    match = _EMAIL_RE.match(text)
    if not match or normalize_domain(match.group(1)) != match.group(1).removeprefix("www."):
        return None
    return text


def email_domain(normalized_email: str) -> str:
    return normalized_email.rsplit("@", 1)[-1]


def normalize_phone(raw: str) -> str | None:
    """E.164 (``+33123456789``) for full numbers, bare digits for short numbers (``3949``).

    French national numbers (``01 23 45 67 89``) get ``+33``; ``+33 (0)1 ...`` drops the ``(0)``;
    ``0033...`` becomes ``+33...``.
    """
    text = raw.strip()
    if text.lower().startswith("tel:"):
        text = text[4:]
    text = text.replace("(0)", "")
    digits = _NOT_DIGIT.sub("", text)
    if text.startswith("+"):
        number = "+" + digits
    elif digits.startswith("00"):
        number = "+" + digits[2:]
    elif len(digits) == 10 and digits[0] == "0" and digits[1] != "0":
        number = "+33" + digits[1:]
    elif 3 <= len(digits) <= 6 and digits == text.replace(" ", ""):
        return digits
    else:
        return None
    if number.startswith("+0") or not 8 <= len(number) - 1 <= 15:
        return None
    if number.startswith("+33") and len(number) != 12:
        return None
    return number


def parent_domains(host: str) -> list[str]:
    """``a.b.gouv.fr`` -> ``[a.b.gouv.fr, b.gouv.fr, gouv.fr, fr]``."""
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]
