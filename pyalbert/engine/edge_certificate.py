"""After a deploy with ``[edge] tls = "acme"``: which certificate the front door serves.

The renewal loop asks the CA in the background (:mod:`pyalbert.commands.acme`); until the first
certificate arrives HAProxy serves a self-signed placeholder. The deploy waits a bounded time
(:data:`FIRST_CERTIFICATE_WAIT_S`) for the CA's certificate only while the placeholder is served,
then says which one it is, on each host of the api: ``issued by <CA> for <name>, valid until
<date>`` or ``still the placeholder`` with where to look. :func:`renew_env` (``fab renew-cert``)
renews now, whatever the expiry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pyalbert.commands import acme
from pyalbert.config.deployment import resolved
from pyalbert.engine.fanout import RunnerFactory, fan_out, raise_errors, ssh_runners, values
from pyalbert.engine.report import HostResult, Printer
from pyalbert.errors import AlbertError
from pyalbert.remote import Runner
from pyalbert.runtimes.base import edge_name
from pyalbert.runtimes.edge import acme_config, renew_now

#: how long a deploy waits for the first certificate (Let's Encrypt: usually a few seconds)
FIRST_CERTIFICATE_WAIT_S = 30.0
POLL_S = 1.0


def certificate_note(runner: Runner, live_pem: str, env: str, directory: str, *, wait_s: float,
                     poll_s: float = POLL_S, sleep: Callable[[float], None] = time.sleep) -> str:
    """One line: the CA's certificate, or the placeholder still after ``wait_s`` (bounded polls)."""
    cmd = acme.certificate(live_pem)
    for attempt in range(max(1, int(wait_s / poll_s) + 1)):
        cert = acme.parse_certificate(runner.run(cmd, check=False).stdout)
        if cert is not None and not cert.placeholder:
            return (f"front door certificate: issued by {cert.issuer} for {cert.subject}, "
                    f"valid until {cert.not_after}")
        if attempt * poll_s >= wait_s:
            break
        sleep(poll_s)
    return (f"front door certificate: still the self-signed placeholder after {wait_s:.0f} s: the "
            f"renewal loop keeps asking {directory} in the background (its 'acme:' lines are in the "
            f"front door's log: fab logs --service api, or {edge_name(env)}'s); clients see the "
            "CA's certificate once it arrives, without a deploy")


def report_certificates(deployment, results: Sequence[HostResult], runners: RunnerFactory,
                        out: Printer, *, wait_s: float = FIRST_CERTIFICATE_WAIT_S,
                        sleep: Callable[[float], None] = time.sleep) -> None:
    """Add the certificate's note to the result of every api host that deployed (and print it)."""
    env = deployment.env
    done = {r.host: r for r in results if r.ok}
    hosts = [a.host for a in deployment.placement.api if a.host.name in done]
    if env.edge.tls != "acme" or not hosts:
        return
    live_pem = acme_config(env).live_pem

    def one(runner: Runner, host, cancel) -> str:
        return certificate_note(runner, live_pem, env.name, env.edge.acme_directory, wait_s=wait_s,
                                sleep=sleep)

    for outcome in fan_out(hosts, one, runners):
        note = outcome.value or f"front door certificate: not asked ({outcome.error})"
        done[outcome.host].notes.append(note)
        out(outcome.host, note, "" if outcome.value and "placeholder" not in note else "yellow")


def renew_env(spec, runners: RunnerFactory | None = None) -> dict[str, object]:
    """Renew the front door's ACME certificate now on every api host (whatever its expiry), install
    it and reload HAProxy gracefully: host -> the certificate's note afterwards."""
    deployment = resolved(spec)
    env = deployment.env
    if env.edge.tls != "acme":
        raise AlbertError(f"environment {env.name} has no automatic certificate to renew ([edge] tls = "
                          f'"{env.edge.tls}"). Fix: set tls = "acme" in environments/{env.name}.toml '
                          "(with acme_domains and acme_email) and deploy.")
    cmd, live_pem = renew_now(env, env.runtime), acme_config(env).live_pem

    def one(runner: Runner, host, cancel) -> str:
        res = runner.run(cmd, check=False, timeout=600)
        if not res.ok:
            said = " ".join((res.stdout + res.stderr).strip().splitlines()[-3:]) or f"exit {res.exit_code}"
            raise AlbertError(f"host {host.name}: the renewal failed ({said}); the front door keeps "
                              "serving its certificate. Fix: see the front door's log (fab logs --service "
                              "api) and the [edge] acme_* keys, then run fab renew-cert again.")
        return certificate_note(runner, live_pem, env.name, env.edge.acme_directory, wait_s=0)

    hosts = list({a.host.name: a.host for a in deployment.placement.api}.values())
    results = values(fan_out(hosts, one, runners or ssh_runners(deployment)))
    raise_errors(results, "renew-cert")
    return results
