"""The api's front door as a unit of the release: HAProxy in front of the blue/green gateways.

Its files (``haproxy.cfg`` rendered from ``[api]``/``[edge]``, the TLS certificate from the File
variable of the ``tls_cert`` secret, 0600) go into the release folder (``<release>/edge/``) and
HAProxy reads them through a link (``<base>/edge-<env>/config``), so a release and its rollback
carry their own front door. Changed files are a graceful reload in place (link, then ``SIGUSR2``
to HAProxy's master: the old worker finishes its connections), never a restart; the unit restarts
only when its own command or image changes. Before anything changes, the preflight check
:class:`HaproxyAccepts` has ``haproxy -c`` read the files in a private scratch folder on the host.

venv runtime: the host's ``/usr/sbin/haproxy`` (Debian's package) under ``albert supervise``;
docker runtime: ``images.edge`` with ``--network host``, as the deploy user. The stats socket and
the servers' state live in ``<base>/edge-<env>/`` (the blue/green switch: :mod:`pyalbert.commands.edge`),
the colours' unix sockets in its ``sockets/`` (HAProxy's servers are ``unix@`` there; docker: the
same folder is mounted at the same path into the edge and both api containers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pyalbert.commands import acme, docker, process
from pyalbert.commands import api as api_cmd
from pyalbert.commands import edge as edge_cmd
from pyalbert.commands.base import Cmd, Secret, combine
from pyalbert.config.environment import EnvironmentSpec
from pyalbert.remote import Result
from pyalbert.runtimes.base import (
    DeployInputs,
    FileSpec,
    Reload,
    Unit,
    config_hash,
    edge_dir,
    edge_name,
    labels,
)
from pyalbert.runtimes.checks import Check, HostFacts, PortFree

CONFIG, CERT, DIGEST_FILE = "haproxy.cfg", "cert.pem", "edge.sha"
#: ``tls = "acme"``: the renewal script (release file), the PEM HAProxy reads and lego's folder
#: (in ``<base>/edge-<env>/``: they outlive releases, a rollback keeps the certificate)
ACME_SCRIPT, ACME_PEM, ACME_DIR = "acme-renew.sh", "tls.pem", "acme"
#: writes each file of a JSON object read on stdin into a fresh private folder, replaces @DIR@ in
#: them and in argv[1:] with it, runs argv[1:] there, removes the folder, exits with its status
CHECK_IN_SCRATCH = (
    "import json,os,shutil,subprocess,sys,tempfile\n"
    "d=tempfile.mkdtemp(prefix='albert-edge-check-')\n"
    "try:\n"
    " for n,t in json.load(sys.stdin).items():\n"
    "  open(os.path.join(d,n),'w').write(t.replace('@DIR@',d))\n"
    " sys.exit(subprocess.run([a.replace('@DIR@',d) for a in sys.argv[1:]]).returncode)\n"
    "finally:\n"
    " shutil.rmtree(d,ignore_errors=True)\n"
)


def config_link(env: EnvironmentSpec) -> str:
    """The folder HAProxy reads its files from: a link to one release's ``edge/``."""
    return f"{edge_dir(env)}/config"


def upstream_file(env: EnvironmentSpec) -> str:
    return f"{edge_dir(env)}/upstream"


def acme_config(env: EnvironmentSpec) -> acme.AcmeConfig:
    """What lego asks for (``[edge] tls = "acme"``) and where it keeps it on the host."""
    e = env.edge
    return acme.AcmeConfig(
        state_dir=f"{edge_dir(env)}/{ACME_DIR}", live_pem=f"{edge_dir(env)}/{ACME_PEM}",
        pid_file=f"{edge_dir(env)}/haproxy.pid", domains=e.acme_domains, email=e.acme_email or "",
        directory=e.acme_directory, port=e.acme_port, ca_file=e.acme_ca_file)


def renew_now(env: EnvironmentSpec, runtime: str) -> Cmd:
    """Renew the ACME certificate now (whatever its expiry), install it and reload HAProxy."""
    cmd = acme.renew_now(f"{config_link(env)}/{ACME_SCRIPT}")
    return Cmd.of("docker", "exec", edge_name(env.name), *cmd.tokens) if runtime == "docker" else cmd


def edge_config(env: EnvironmentSpec, folder: str, scratch: bool = False) -> edge_cmd.EdgeConfig:
    """The config HAProxy reads from ``folder`` (``scratch``: the check's own socket and state)."""
    place = folder if scratch else edge_dir(env)
    servers = tuple((c, f"unix@{api_cmd.socket_path(edge_dir(env), c)}") for c in api_cmd.COLOURS)
    tls, auto = env.edge.tls, env.edge.tls == "acme"
    pem = {"file": f"{folder}/{CERT}", "acme": f"{place}/{ACME_PEM}"}.get(tls)
    return edge_cmd.EdgeConfig(
        env=env.name, port=env.api.port, servers=servers, socket=f"{place}/haproxy.sock",
        state_file=f"{place}/servers.state", tls_pem=pem,
        redirect_port=env.edge.redirect_port, max_body_bytes=env.api.max_body_bytes,
        max_header_bytes=env.api.max_header_bytes, read_timeout_s=env.api.read_timeout_s,
        stream_timeout_s=env.edge.stream_timeout_s, threads=env.edge.threads,
        acme_port=env.edge.acme_port if auto else None,
        acme_program=acme.program_command(f"{folder}/{ACME_SCRIPT}") if auto else None,
        pid_file=f"{place}/haproxy.pid" if auto else None)


def placeholder_pem() -> str:
    """A self-signed certificate + key: what ``haproxy -c`` reads in the scratch folder before
    the CA signed the real one (the host makes its own: :func:`acme.ensure_placeholder`)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, acme.PLACEHOLDER_CN)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (cert.public_bytes(pem) + key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption())).decode()


def edge_material(env: EnvironmentSpec, inputs: DeployInputs, folder: str,
                  scratch: bool = False) -> dict[str, str]:
    """File name -> content of the edge's files read from ``folder``."""
    files = {CONFIG: edge_cmd.render_config(edge_config(env, folder, scratch))}
    if env.edge.tls == "file":
        cert = inputs.secrets.get("tls_cert", "")
        files[CERT] = cert.strip() + "\n"
    if env.edge.tls == "acme":
        files[ACME_SCRIPT] = acme.render_loop(acme_config(env))
        if scratch:
            files[ACME_PEM] = placeholder_pem()
    return files


def files_digest(material: dict[str, str]) -> str:
    return config_hash({n: (config_hash({"s": t}) if n == CERT else t) for n, t in material.items()})


@dataclass(frozen=True)
class HaproxyAccepts(Check):
    """``haproxy -c`` accepts the rendered config and certificate (in a private scratch folder)."""

    files: tuple[tuple[str, str], ...]
    #: the checker's argv, ``@DIR@`` for the scratch folder (the host's haproxy, or the image's)
    argv: tuple[str, ...]

    @property
    def what(self) -> str:  # type: ignore[override]
        return "haproxy -c accepts the front door's config and certificate"

    @property
    def cmd(self) -> Cmd:
        return Cmd.of("python3", "-c", CHECK_IN_SCRATCH, list(self.argv),
                      stdin=Secret(json.dumps(dict(self.files))))

    def judge(self, res: Result, host: HostFacts) -> str | None:
        if res.ok:
            return None
        lines = [line for line in (res.stderr + "\n" + res.stdout).splitlines()
                 if "ALERT" in line or "rror" in line][-3:]
        said = " ".join(line.strip() for line in lines) or f"exit {res.exit_code}"
        return (f"haproxy refused the front door's config rendered from [edge]/[api] ({said}); "
                f"nothing was changed. Fix: correct [edge] of environments/{host.env}.toml, or the "
                "certificate file of $ALBERT_TLS_CERT (PEM: the certificate chain then its private "
                "key), and deploy again.")


def edge_unit(env: EnvironmentSpec, runtime: str, inputs: DeployInputs, release_dir: str, *,
              albert: str = "", state: str = "") -> tuple[Unit, list[FileSpec], list[Check]]:
    """The unit, its release files, its preflight check."""
    name, folder = edge_name(env.name), f"{release_dir}/edge"
    material = edge_material(env, inputs, config_link(env))
    digest_files = files_digest(material)
    release_files = [FileSpec(f"{folder}/{n}", text, secret=n == CERT) for n, text in material.items()]
    release_files.append(FileSpec(f"{folder}/{DIGEST_FILE}", digest_files + "\n"))

    def unit_labels_for(digest: str) -> dict[str, str]:
        return labels(env.name, "edge", None, inputs.release_id, digest)

    config = f"{config_link(env)}/{CONFIG}"
    if runtime == "docker":
        argv = edge_cmd.serve_argv(config, "haproxy")
        digest = config_hash({"runtime": runtime, "image": env.images.edge, "argv": argv,
                              **({"volumes": acme_volumes(env)} if acme_volumes(env) else {})})
        base = env.deploy.base_dir
        volumes = [f"{edge_dir(env)}:{edge_dir(env)}", f"{base}/releases:{base}/releases:ro",
                   *acme_volumes(env)]
        start = docker.run(name, env.images.edge, argv[1:], entrypoint=argv[0], network="host",
                           volumes=volumes, user=docker.AS_DEPLOY_USER, labels=unit_labels_for(digest))
        stop, probe, logs = docker.stop(name, 5), docker.inspect_state(name), docker.logs(name, 40)
        signal = docker.kill_signal(name, "USR2")
        checker = ("docker", "run", "--rm", "--network", "none", "-v", "@DIR@:@DIR@:ro",
                   "--entrypoint", "haproxy", env.images.edge, "-c", "-q", "-f", f"@DIR@/{CONFIG}")
    else:
        argv = edge_cmd.serve_argv(config)
        digest = config_hash({"runtime": runtime, "argv": argv})
        start = process.start(albert, state, name, argv, labels=unit_labels_for(digest), stop_timeout=5)
        stop, probe = process.stop(albert, state, name, 5), process.status(albert, state, [name])
        logs, signal = process.logs(state, name, 40), process.signal(albert, state, name, "USR2")
        checker = (*edge_cmd.check(f"@DIR@/{CONFIG}").tokens,)  # type: ignore[assignment]
    point = point_at(env, release_dir)
    if env.edge.tls == "acme":  # HAProxy needs a certificate to start with: a placeholder
        point = combine(point, acme.ensure_placeholder(acme_config(env).live_pem))
    unit = Unit(name=name, service="edge", config_hash=digest, start=combine(point, start),
                stop=stop, probe=probe, logs=logs, ready=None, port=env.api.port,
                reload=Reload(digest=digest_files, probe=Cmd.of("cat", f"{config_link(env)}/{DIGEST_FILE}"),
                              apply=combine(point, signal)))
    checks: list[Check] = [HaproxyAccepts(tuple(sorted(edge_material(env, inputs, "@DIR@", scratch=True).items())),
                                          tuple(str(t) for t in checker))]
    if env.edge.tls == "acme":  # lego's challenge listener (ours while the front door runs)
        checks.append(PortFree(env.edge.acme_port, name, key="[edge] acme_port"))
    return unit, release_files, checks


def acme_volumes(env: EnvironmentSpec) -> list[str]:
    """docker: the host's lego (one static binary), system roots and the directory's CA bundle."""
    if env.edge.tls != "acme":
        return []
    ca = env.edge.acme_ca_file
    return [f"{acme.LEGO_BIN}:{acme.LEGO_BIN}:ro", "/etc/ssl/certs:/etc/ssl/certs:ro",
            *([f"{ca}:{ca}:ro"] if ca else [])]


def point_at(env: EnvironmentSpec, release_dir: str) -> Cmd:
    """Point :func:`config_link` at ``release_dir``'s edge files atomically (symlink + rename)."""
    link = config_link(env)
    return combine(Cmd.of("mkdir", "-p", edge_dir(env), api_cmd.sockets_dir(edge_dir(env))),
                   Cmd.of("ln", "-sfn", f"{release_dir}/edge", f"{link}.tmp"),
                   Cmd.of("mv", "-Tf", f"{link}.tmp", link))
