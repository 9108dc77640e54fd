"""``[edge] tls = "acme"`` (issue 16) against a real ACME server: pebble, Let's Encrypt's test CA.

pebble and pebble-challtestsrv (Debian's package) run on this machine, pebble on the host link's
address; challtestsrv's DNS answers every name with the test host's address, so pebble's http-01
validation reaches the host's front door on its plain port (pebble's ``httpPort``), where HAProxy
passes it to lego on the loopback. Both runtimes: venv (the host's HAProxy and lego under the
supervisor) and docker (``images.edge`` with the host's lego mounted read-only, the renewal loop
inside the container). A real TLS client that trusts only pebble's root gets the api's answer
with the issued certificate; the deploy report says whether the certificate is still the
placeholder or issued; a second deploy changes nothing; a forced renewal swaps the certificate
while a keep-alive client keeps getting answers (none fails).
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pyalbert.devtools.test_ca import make_test_ca
from pyalbert.engine.edge_certificate import renew_env
from pyalbert.engine.operations import deploy_env

MODEL = {"m-a": {"model": "org/a", "port": 18401}}
DOMAIN = "api.acme-albert.test"
API_PORT, PLAIN_PORT = 18491, 18492

pytestmark = pytest.mark.skipif(not (shutil.which("pebble") and shutil.which("pebble-challtestsrv")
                                     and shutil.which("lego")),
                                reason="pebble, pebble-challtestsrv or lego missing (./scripts/bootstrap)")


def trusting(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@dataclass
class Pebble:
    directory: str
    management: str
    tls_ca: Path
    procs: list[subprocess.Popen]

    def root(self, into: Path) -> str:
        """pebble's issuing root (a new one each start): what the test's clients trust."""
        r = httpx.get(f"{self.management}/roots/0", verify=trusting(str(self.tls_ca)), timeout=10)
        r.raise_for_status()
        into.write_text(r.text)
        return str(into)


def wait_listening(address: str, port: int, proc: subprocess.Popen, log: Path) -> None:
    for _ in range(100):  # bounded: 10 s
        assert proc.poll() is None, log.read_text()
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {address}:{port}: {log.read_text()}")


@pytest.fixture
def pebble(env, tmp_path):
    """challtestsrv (DNS: every name is the test host) and pebble (http-01 on the plain port)."""
    link = env.host.gateway  # this machine's address as the host sees it
    ca = make_test_ca(tmp_path / "pebble-tls", (link, "127.0.0.1"))
    dns, acme_port, mgmt, cts_mgmt = free_port(), free_port(link), free_port(), free_port()
    config = tmp_path / "pebble.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"{link}:{acme_port}", "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(ca / "server.crt"), "privateKey": str(ca / "server.key"),
        "httpPort": PLAIN_PORT, "tlsPort": free_port(), "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}))
    logs = tmp_path / "challtestsrv.log", tmp_path / "pebble.log"
    procs = [subprocess.Popen(
        ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "",
         "-tlsalpn01", "", "-management", f"127.0.0.1:{cts_mgmt}",
         "-defaultIPv4", env.host.address, "-defaultIPv6", ""],
        stdout=logs[0].open("w"), stderr=subprocess.STDOUT)]
    try:
        wait_listening("127.0.0.1", cts_mgmt, procs[0], logs[0])
        procs.append(subprocess.Popen(
            ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns}"],
            env={"PATH": "/usr/bin:/bin", "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"},
            stdout=logs[1].open("w"), stderr=subprocess.STDOUT))
        wait_listening(link, acme_port, procs[1], logs[1])
        # lego on the host checks pebble's own TLS with this CA (the host has its own /tmp)
        on_host = f"{env.base}/pebble-tls-ca.pem"
        env.host.run(f"install -d -o gitlab -g gitlab {env.base} && cat > {on_host} && chmod 644 {on_host}",
                     input=(ca / "ca.pem").read_text())
        yield Pebble(f"https://{link}:{acme_port}/dir", f"https://127.0.0.1:{mgmt}", ca / "ca.pem", procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def served_cert(address: str, root: str) -> dict:
    """The certificate the front door shows for DOMAIN, verified against ``root`` (raises if not)."""
    ctx = trusting(root)
    with socket.create_connection((address, API_PORT), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=DOMAIN) as tls:
        return tls.getpeercert()


def wait_issued(env, root: str) -> dict:
    """Poll (bounded, 90 s) until HAProxy serves a certificate pebble signed (the placeholder first)."""
    for _ in range(180):
        try:
            return served_cert(env.host.address, root)
        except (ssl.SSLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"no certificate from pebble within 90 s; the front door's log:\n{edge_log(env)}")


def edge_log(env) -> str:
    if env.runtime == "docker":
        out = env.host.run(["docker", "logs", "--tail", "40", f"albert-{env.name}-api"], check=False)
        return out.stdout + out.stderr
    return env.host.run(f"tail -n 40 {env.state}/albert-{env.name}-api.log", check=False).stdout


def common_name(cert: dict) -> str:
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")


def test_acme_certificate_issued_kept_and_renewed_without_a_failed_request(env, pebble, tmp_path):
    env.write(MODEL, api_port=API_PORT, extra=f"""[edge]
tls = "acme"
redirect_port = {PLAIN_PORT}
acme_domains = ["{DOMAIN}"]
acme_email = "ops@albert.test"
acme_directory = "{pebble.directory}"
acme_ca_file = "{env.base}/pebble-tls-ca.pem"
""")
    (first,) = deploy_env(env.spec(), quiet=True)
    assert first.status == "deployed", first.error
    # the deploy waited (bounded) for the first certificate and says it is the CA's
    assert first.notes and first.notes[0].startswith("front door certificate: issued by Pebble"), \
        (first.notes, edge_log(env))
    assert f"for {DOMAIN}, valid until" in first.notes[0]
    root = pebble.root(tmp_path / "pebble-root.pem")
    issued = wait_issued(env, root)
    assert common_name(issued) == DOMAIN and ("DNS", DOMAIN) in issued["subjectAltName"]
    url = f"https://{env.host.address}:{API_PORT}"
    sni = {"sni_hostname": DOMAIN}
    with httpx.Client(verify=trusting(root), timeout=20) as client:  # a real client: trusts pebble's root only
        r = client.get(f"{url}/v1/models", extensions=sni, headers={"Host": DOMAIN})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "m-a"
    # the plain port: challenges go to lego (404 for an unknown token), the rest is redirected
    plain = f"http://{env.host.address}:{PLAIN_PORT}"
    assert httpx.get(f"{plain}/.well-known/acme-challenge/nope", headers={"Host": DOMAIN}).status_code != 308
    assert httpx.get(f"{plain}/v1/models", headers={"Host": DOMAIN}).status_code == 308
    # a second deploy changes nothing, and no new certificate is asked for
    crt = f"{env.base}/edge-{env.name}/acme/certificates/{DOMAIN}.crt"
    before = env.host.run(["cat", crt]).stdout
    (again,) = deploy_env(env.spec(), quiet=True)
    assert again.status == "unchanged" and not again.changed, (again.status, again.changed)
    assert served_cert(env.host.address, root)["serialNumber"] == issued["serialNumber"]
    assert env.host.run(["cat", crt]).stdout == before
    # a forced renewal: a new certificate, a keep-alive client's requests all answered meanwhile
    answered, failures, stop = [0], [], threading.Event()

    def keep_alive_client() -> None:
        with httpx.Client(verify=trusting(root), timeout=20) as c:
            while not stop.is_set():
                try:
                    r = c.get(f"{url}/v1/models", extensions=sni, headers={"Host": DOMAIN})
                    answered[0] += 1
                    if r.status_code != 200:
                        failures.append(r.status_code)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    client_thread = threading.Thread(target=keep_alive_client, daemon=True)
    client_thread.start()
    try:
        # fab renew-cert, over SSH as the deploy user (docker: exec'd in the edge container)
        (note,) = renew_env(env.spec()).values()
        assert note.startswith("front door certificate: issued by Pebble"), note
        for _ in range(100):  # bounded: until the reloaded front door shows the new certificate
            renewed = served_cert(env.host.address, root)
            if renewed["serialNumber"] != issued["serialNumber"]:
                break
            time.sleep(0.2)
        count = answered[0]
        for _ in range(100):  # and the client kept going after the swap
            if answered[0] >= count + 20:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        client_thread.join(30)
    assert renewed["serialNumber"] != issued["serialNumber"] and common_name(renewed) == DOMAIN
    assert failures == [] and answered[0] >= count + 20, (failures[:5], answered[0])


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
