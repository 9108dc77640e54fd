"""API keys of the gateway: the keys file, hashing, per-key rate limits.

The keys file (JSON or YAML; its path is the ``api_keys`` secret, ``$ALBERT_API_KEYS``)::

    keys:
      - name: team-data            # shows in access logs and metrics (never the key)
        sha256: 3b1f...e9          # `echo -n KEY | albert api hash-key`
        models: ["*"]              # or a list of model ids of the routing table
        requests_per_minute: 600   # optional, no limit when absent
        tokens_per_minute: 200000  # optional (prompt + completion tokens reported by vLLM)
        max_tokens: 2048           # optional cap on max_tokens of one request
        max_n: 4                   # optional cap on n (choices) of one request
      - name: prometheus
        sha256: 9a0c...41
        models: []                 # no model: this key only reads /metrics
        scrape: true               # may read /metrics (api.metrics_auth, on by default)

Only the SHA-256 of a key is stored (keys are long random strings, so a salted slow hash buys
nothing and would cost CPU on every request). Limits are token buckets per gateway process: with
N workers each enforces 1/N of the per-minute figures.

Tokens per minute are reserved, then settled: a request is admitted when the bucket holds what it
may use at most (capped at the bucket's size), that much is taken at once (concurrent requests
cannot all pass on one full bucket), and the difference with what it really used is given back or
taken when it ends, disconnects and cut streams included (:mod:`pyalbert.api.admission`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pyalbert.errors import AlbertError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MIN_KEY_LENGTH = 16


def hash_key(key: str) -> str:
    """The stored form of a key."""
    key = key.strip()
    if len(key) < MIN_KEY_LENGTH:
        raise AlbertError(
            f"the key is {len(key)} characters long; use at least {MIN_KEY_LENGTH} random "
            "characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)."
        )
    return hashlib.sha256(key.encode()).hexdigest()


class KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    sha256: str
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_n: int | None = Field(None, ge=1)
    #: may read /metrics when api.metrics_auth is on
    scrape: bool = False

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.strip().lower()
        if not SHA256_RE.match(value):
            raise ValueError("must be 64 hexadecimal characters (the output of `albert api hash-key`)")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[KeySpec, ...] = ()


class Bucket:
    """A token bucket refilled continuously: ``capacity`` per minute."""

    __slots__ = ("capacity", "rate", "level", "stamp")

    def __init__(self, per_minute: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        level = self.level + (now - self.stamp) * self.rate
        self.level = self.capacity if level > self.capacity else level
        self.stamp = now

    def wait_time(self, cost: float, now: float) -> float:
        """0 if ``cost`` fits now (nothing is taken), else seconds until it would."""
        self._refill(now)
        if self.level >= cost:
            return 0.0
        return (cost - self.level) / self.rate

    def take(self, cost: float, now: float) -> None:
        """Take ``cost`` (negative: give back, up to the capacity)."""
        self._refill(now)
        level = self.level - cost  # may go negative: a debt paid back before the next request
        self.level = self.capacity if level > self.capacity else level


class Key:
    """A loaded key with its live rate-limit state."""

    __slots__ = ("name", "all_models", "models", "max_tokens", "max_n", "scrape", "requests",
                 "tokens")

    def __init__(self, spec: KeySpec, workers: int = 1):
        self.name = spec.name
        self.all_models = "*" in spec.models
        self.models = frozenset(spec.models)
        self.max_tokens = spec.max_tokens
        self.max_n = spec.max_n
        self.scrape = spec.scrape
        self.requests = (Bucket(max(1.0, spec.requests_per_minute / workers))
                         if spec.requests_per_minute else None)
        self.tokens = (Bucket(max(1.0, spec.tokens_per_minute / workers))
                       if spec.tokens_per_minute else None)

    def allows(self, model: str) -> bool:
        return self.all_models or model in self.models

    def admit(self, reserve: int = 1) -> tuple[float, str]:
        """(0, "") if a request may start now, else (seconds to wait, which limit).

        Admitted, it counts one request and reserves ``reserve`` tokens (see :meth:`settle`); it
        needs that many tokens in the bucket, or a full bucket when ``reserve`` is larger.
        """
        now = time.monotonic()
        tokens = self.tokens
        if tokens is not None:
            need = min(max(1.0, float(reserve)), tokens.capacity)
            wait = tokens.wait_time(need, now)
            if wait:
                return wait, "tokens per minute"
        if self.requests is not None:
            wait = self.requests.wait_time(1.0, now)
            if wait:
                return wait, "requests per minute"
            self.requests.take(1.0, now)
        if tokens is not None and reserve > 0:
            tokens.take(float(reserve), now)
        return 0.0, ""

    def settle(self, reserved: int, used: int) -> None:
        """The request that reserved ``reserved`` tokens used ``used``: give back or take more."""
        if self.tokens is not None and used != reserved:
            self.tokens.take(float(used - reserved), time.monotonic())


class KeyStore:
    """sha256 hex -> :class:`Key`. ``open`` stores accept any caller (``--no-auth``)."""

    def __init__(self, keys: dict[str, Key] | None = None, *, open_access: bool = False,
                 source: str = ""):
        self.by_hash = keys or {}
        self.open_access = open_access
        self.source = source
        self.anonymous = Key(KeySpec(name="anonymous", sha256="0" * 64))

    def __len__(self) -> int:
        return len(self.by_hash)

    def lookup(self, token: bytes) -> Key | None:
        return self.by_hash.get(hashlib.sha256(token).hexdigest())

    def carry_state_from(self, old: KeyStore) -> None:
        """Keep rate-limit buckets of keys that survive a reload."""
        for digest, key in self.by_hash.items():
            previous = old.by_hash.get(digest)
            if previous is None:
                continue
            for attr in ("requests", "tokens"):
                new_b, old_b = getattr(key, attr), getattr(previous, attr)
                if new_b is not None and old_b is not None:
                    new_b.level = min(old_b.level, new_b.capacity)
                    new_b.stamp = old_b.stamp

    @classmethod
    def load(cls, path: Path, *, workers: int = 1) -> KeyStore:
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AlbertError(
                f"keys file {name} cannot be read ({exc.strerror}). Fix: point $ALBERT_API_KEYS "
                "or --keys at a readable keys file."
            ) from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise AlbertError(f"keys file {name} is not valid JSON/YAML: "
                              f"{str(exc).splitlines()[0]}. Fix: correct its syntax.") from None
        if isinstance(data, list):
            data = {"keys": data}
        try:
            parsed = KeysFile.model_validate(data or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise AlbertError(
                f"keys file {name}: key '{where}': {err['msg'].removeprefix('Value error, ')}. "
                "Fix: see the format in `albert api --help` (pyalbert/api/keys.py)."
            ) from None
        keys: dict[str, Key] = {}
        names: set[str] = set()
        for spec in parsed.keys:
            if spec.sha256 in keys or spec.name in names:
                raise AlbertError(f"keys file {name}: key {spec.name!r} appears twice (same name "
                                  "or same hash). Fix: keep one entry per key.")
            keys[spec.sha256] = Key(spec, workers)
            names.add(spec.name)
        return cls(keys, source=name)
