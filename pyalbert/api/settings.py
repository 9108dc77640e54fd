"""What one gateway needs to run, resolved from the environment (``ApiSpec``) and the CLI.

Plain data that survives a round trip through JSON: uvicorn workers are separate processes and
receive it in ``$ALBERT_API_SETTINGS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pyalbert.api.backends_reload import POLL_S
from pyalbert.errors import AlbertError

SETTINGS_ENV = "ALBERT_API_SETTINGS"
#: ``[api]`` keys that GatewaySettings takes from the environment file when ApiSpec defines them
OPTIONAL_API_FIELDS = ("max_n_cap", "metrics_auth", "max_header_bytes", "read_timeout_s")


@dataclass(frozen=True)
class GatewaySettings:
    #: model id -> base URLs of its replicas
    backends: dict[str, tuple[str, ...]]
    env: str = "local"
    host: str = "0.0.0.0"
    port: int = 8080
    #: a unix socket served beside the port: the front door's way in (X-Forwarded-For trusted there)
    uds: str | None = None
    workers: int = 1
    whitelist_mode: str = "off"
    whitelist_path: str | None = None
    keys_path: str | None = None
    #: a file holding the model servers' key (vLLM ``--api-key``), sent as their Bearer token
    upstream_key_path: str | None = None
    #: no keys at all: anyone may call (``--no-auth``, tests and laptops)
    open_access: bool = False
    #: /metrics needs a scrape key (a key with ``scrape: true`` in the keys file); off: open
    metrics_auth: bool = True
    max_body_bytes: int = 1_000_000
    max_tokens_cap: int | None = None
    #: cap on ``n`` (and ``best_of``): choices multiply the tokens one request generates
    max_n_cap: int | None = 16
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 120.0
    total_timeout_s: float = 600.0
    probe_interval_s: float = 1.0
    #: request line + headers; larger heads get 431 (pyalbert.api.http_guard)
    max_header_bytes: int = 32 * 1024
    #: a whole request (head and body) must arrive within this, else 408 and the connection closes
    read_timeout_s: float = 30.0
    access_log: bool = True
    #: a folder of per-replica routes the deploy writes during a model replace (watched)
    routes_dir: str | None = None
    routes_poll_s: float = POLL_S
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends",
                           {m: tuple(urls) for m, urls in self.backends.items()})

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GatewaySettings:
        return cls(**json.loads(text))

    @classmethod
    def from_environ(cls) -> GatewaySettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise AlbertError(f"${SETTINGS_ENV} is not set: start the gateway with `albert api`.")
        return cls.from_json(raw)

    def with_(self, **changes: Any) -> GatewaySettings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_backends(value: str) -> dict[str, tuple[str, ...]]:
    """``--backends``: JSON text or a JSON/YAML file of ``{model id: [base URL, ...]}``."""
    text = value
    source = "--backends"
    if not value.lstrip().startswith("{"):
        path = Path(value)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AlbertError(f"--backends names the file {value!r}, which cannot be read "
                              f"({exc.strerror}). Fix: pass JSON like "
                              "'{\"model\": [\"http://host:8000\"]}' or a readable file.") from None
    try:
        if source.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's
        raise AlbertError(f"{source} is not valid JSON/YAML ({str(exc).splitlines()[0]}). Fix: "
                          "use {\"model id\": [\"http://host:port\", ...]}.") from None
    if not isinstance(data, dict) or not data:
        raise AlbertError(f"{source} must map model ids to lists of base URLs, e.g. "
                          "{\"org/model\": [\"http://10.0.0.1:8000\"]}.")
    out: dict[str, tuple[str, ...]] = {}
    for model, urls in data.items():
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not urls or not all(
                isinstance(u, str) and u.startswith("http://") for u in urls):
            raise AlbertError(f"{source}: model {model!r} needs a non-empty list of http:// base "
                              f"URLs, got {urls!r}. Fix: e.g. [\"http://10.0.0.1:8000\"].")
        out[str(model)] = tuple(u.rstrip("/") for u in urls)
    return out


def settings_from_spec(spec: Any, backends: dict[str, tuple[str, ...]] | None = None,
                       **overrides: Any) -> GatewaySettings:
    """Settings of environment ``spec`` (a DeploymentSpec); CLI flags in ``overrides``."""
    api = spec.env.api
    if backends is None:
        from pyalbert.config import resolved

        backends = {m: tuple(urls) for m, urls in resolved(spec).placement.backends.items()}
    keys_path = None
    ref = spec.env.secrets.get("api_keys")
    if ref is not None and os.environ.get(ref.env):
        keys_path = os.environ[ref.env]
    whitelist_path = None
    candidate = Path(spec.config_dir) / spec.env.whitelist.output
    if candidate.is_file():
        whitelist_path = str(candidate)
    base = GatewaySettings(
        backends=backends,
        env=spec.env.name,
        port=api.port,
        workers=api.workers,
        whitelist_mode=api.whitelist_mode,
        whitelist_path=whitelist_path,
        keys_path=keys_path,
        max_body_bytes=api.max_body_bytes,
        max_tokens_cap=api.max_tokens_cap,
        # read when the environment model has them (ApiSpec); else the defaults above
        **{name: getattr(api, name) for name in OPTIONAL_API_FIELDS if hasattr(api, name)},
        connect_timeout_s=api.connect_timeout_s,
        first_byte_timeout_s=api.first_byte_timeout_s,
        total_timeout_s=api.total_timeout_s,
    )
    return base.with_(**overrides)
