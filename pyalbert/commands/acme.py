"""Automatic certificates for the front door (``[edge] tls = "acme"``): lego, pure builders.

lego (Debian's package, one static binary) obtains and renews the certificate with the http-01
challenge: the CA asks ``http://<domain>/.well-known/acme-challenge/<token>`` on the plain port
(``redirect_port``, 80 in production), where HAProxy passes that path to lego's own listener on
the host's loopback (``acme_port``) and redirects everything else to HTTPS.

The renewal loop (``templates/acme-renew.sh.j2``) runs as a ``program`` of HAProxy's master, so
it lives and dies with the front door on both runtimes, as the deploy user: obtain when there is
no certificate, else renew when fewer than 30 days are left; when lego's PEM differs from the one
HAProxy reads, install it (0600, write then rename) and reload HAProxy gracefully (``SIGUSR2`` to
the master, whose pid is in ``haproxy.pid``). Until the first certificate arrives HAProxy serves
a self-signed placeholder (:func:`ensure_placeholder`). Failures retry after 1 min, doubling up
to 1 h (Let's Encrypt allows 5 failed validations per name and hour); a success sleeps 12 h.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from pyalbert.commands.base import Cmd
from pyalbert.commands.render import render

LEGO_BIN = "/usr/bin/lego"
#: renew when fewer days are left (Let's Encrypt's certificates last 90 days)
RENEW_DAYS = 30
#: more days than any certificate lasts: renew now
FORCE_DAYS = 100_000
CHALLENGE_PATH = "/.well-known/acme-challenge/"
PLACEHOLDER_CN = "albert-acme-placeholder"


@dataclass(frozen=True)
class AcmeConfig:
    """Where lego keeps its account and certificates, what it asks for and from whom."""

    #: lego's ``--path`` (accounts/, certificates/), on the host
    state_dir: str
    #: the PEM HAProxy reads (certificate chain + key, 0600)
    live_pem: str
    #: HAProxy's master pid (``pidfile``), signalled to reload
    pid_file: str
    domains: tuple[str, ...]
    email: str
    directory: str
    port: int
    ca_file: str | None = None
    binary: str = LEGO_BIN

    @property
    def lego_pem(self) -> str:
        """The PEM lego writes (``--pem``: key + chain) for the first domain."""
        return f"{self.state_dir}/certificates/{self.domains[0]}.pem"

    @property
    def lego_crt(self) -> str:
        """lego's certificate: present once one was obtained (then ``renew``, else ``run``)."""
        return f"{self.state_dir}/certificates/{self.domains[0]}.crt"


def lego(c: AcmeConfig, action: str, *options: str) -> Cmd:
    """``lego <global options> run|renew <options>``: http-01 on loopback ``c.port`` only; the
    directory's TLS is checked with ``c.ca_file`` when set (lego's ``LEGO_CA_CERTIFICATES``)."""
    domains = [t for d in c.domains for t in ("--domains", d)]
    trust = ("env", f"LEGO_CA_CERTIFICATES={c.ca_file}") if c.ca_file else ()
    return Cmd.of(*trust, c.binary, "--path", c.state_dir, "--server", c.directory, "--accept-tos",
                  "--email", c.email, *domains, "--key-type", "ec256", "--pem", "--http",
                  "--http.port", f"127.0.0.1:{c.port}", action, *options)


def obtain(c: AcmeConfig) -> Cmd:
    """The first certificate (registers the account when there is none)."""
    return lego(c, "run")


def renew(c: AcmeConfig, days: int = RENEW_DAYS) -> Cmd:
    """Renew when fewer than ``days`` are left, else exit 0 without asking the CA."""
    return lego(c, "renew", "--days", str(days), "--no-random-sleep")


def render_loop(c: AcmeConfig) -> str:
    """The renewal script HAProxy's master runs (``sh <script> loop``) and :func:`renew_now` calls."""
    q = {"live": c.live_pem, "crt": c.lego_crt, "pem": c.lego_pem, "pid": c.pid_file,
         "for_file": f"{c.state_dir}/domains", "want": " ".join(c.domains)}
    return render("acme-renew.sh.j2", c=c, q={k: shlex.quote(v) for k, v in q.items()},
                  days=RENEW_DAYS, obtain=obtain(c).render(), renew=renew(c).render(),
                  force=renew(c, FORCE_DAYS).render())


def program_command(script: str) -> str:
    """The ``command`` line of HAProxy's ``program`` section (single quotes: no ``$`` expansion)."""
    return " ".join(f"'{a}'" for a in ("sh", script, "loop"))


def renew_now(script: str) -> Cmd:
    """Renew now whatever the expiry, install the new certificate and reload HAProxy."""
    return Cmd.of("sh", script, "now")


def ensure_placeholder(live_pem: str) -> Cmd:
    """A self-signed certificate for HAProxy to start with, only when ``live_pem`` is missing
    (the renewal loop replaces it once the CA signed the real one)."""
    script = ('test -s "$1" && exit 0; umask 077; mkdir -p "$(dirname "$1")" && d=$(mktemp -d) && '
              "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 "
              f'-subj /CN={PLACEHOLDER_CN} -keyout "$d/key" -out "$d/crt" 2>"$d/err" && '
              'cat "$d/crt" "$d/key" > "$1.tmp" && mv -f "$1.tmp" "$1"; s=$?; '
              '[ $s = 0 ] || cat "$d/err" >&2; rm -rf "$d"; exit $s')
    return Cmd.of("sh", "-c", script, "sh", live_pem)



@dataclass(frozen=True)
class Certificate:
    """The certificate HAProxy serves (:func:`certificate`): the placeholder, or the CA's."""

    subject: str
    issuer: str
    not_after: str

    @property
    def placeholder(self) -> bool:
        return self.subject == PLACEHOLDER_CN


def certificate(live_pem: str) -> Cmd:
    """Who the certificate HAProxy reads is for, who signed it, until when (the PEM's first one)."""
    return Cmd.of("openssl", "x509", "-noout", "-subject", "-issuer", "-enddate", "-in", live_pem)


def parse_certificate(stdout: str) -> Certificate | None:
    """``subject=CN = x`` / ``issuer=...`` / ``notAfter=...`` lines (None: no certificate there)."""
    fields = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    if "subject" not in fields:
        return None

    def common_name(name: str) -> str:
        found = re.search(r"CN\s*=\s*([^,/]+)", name)
        return (found[1] if found else name).strip()

    return Certificate(common_name(fields["subject"]), common_name(fields.get("issuer", "")),
                       fields.get("notAfter", "").strip())
