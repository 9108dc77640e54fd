"""The api's front door (issue 16): HAProxy in front of the blue/green gateways, on both runtimes.

Zero failed requests across api switches (new-connection and keep-alive clients), TLS with a
test CA (the openai client, ``curl --http2``, the HTTP→HTTPS redirect), a refused certificate
changes nothing, a certificate rotation is a reload that drops no open connection, and the
client's address (never the one a client claims) reaches the gateway's access log.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time

import httpx
import pytest

from pyalbert.devtools.test_ca import make_test_ca
from pyalbert.engine.operations import deploy_env, down_env
from pyalbert.errors import AlbertError

MODEL = {"m-a": {"model": "org/a", "port": 18401}}
BODY = {"model": "m-a", "messages": [{"role": "user", "content": "hi"}]}


class Load:
    """Clients posting chats until stopped: ``keep`` on one keep-alive connection each, the others
    on a new connection per request. Counts answers and failures (any non-200 or error)."""

    def __init__(self, url: str, keep: int, fresh: int, verify: str | bool = True):
        self.url, self.verify = url, verify
        self.ok, self.errors, self.stop = 0, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(k,), daemon=True)
                        for k in [True] * keep + [False] * fresh]

    def client(self, keep_alive: bool) -> None:
        with httpx.Client(timeout=20, verify=self.verify) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(f"{self.url}/v1/chat/completions", json=BODY,
                               headers={} if keep_alive else {"Connection": "close"})
                    failure = None if r.status_code == 200 else r.status_code
                except httpx.HTTPError as exc:
                    failure = repr(exc)
                with self.lock:
                    if failure is None:
                        self.ok += 1
                    else:
                        self.errors.append(failure)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def redeploy(env, version: int, **kw) -> None:
    env.write(MODEL, vllm_env={"FAKE_API_VERSION": str(version)}, **kw)
    (res,) = deploy_env(env.spec(), service="api", quiet=True)
    assert res.status == "deployed", res.error


def test_ten_thousand_requests_across_five_switches_fail_none(env):
    env.write(MODEL, api_port=18480)
    deploy_env(env.spec(), quiet=True)
    url = f"http://{env.host.address}:18480"
    with Load(url, keep=4, fresh=2) as load:
        for version in range(2, 7):
            redeploy(env, version, api_port=18480)
        for _ in range(600):  # bounded: at least 10,000 answers in all
            if load.ok >= 10_000:
                break
            load.stop.wait(0.5)
    assert load.errors == [] and load.ok >= 10_000
    assert half_closed_answer(env.host.address, 18480) == "echo: hi"
    down_env(env.spec())


def half_closed_answer(address: str, port: int) -> str:
    """A client that sends its request, closes its sending side, then reads the whole answer."""
    body = json.dumps(BODY).encode()
    with socket.create_connection((address, port), timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, rest = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    found = re.search(r'"content":\s*"([^"]*)"', rest)
    return found.group(1) if found else rest


def gateway_log(env) -> str:
    if env.runtime == "venv":
        return env.host.run(f"cat {env.state}/albert-{env.name}-api-*.log").stdout
    names = env.host.run(["docker", "ps", "--format", "{{.Names}}"]).stdout.split()
    return "".join(env.host.run(["docker", "logs", n], check=False).stdout + "\n"
                   for n in names if f"albert-{env.name}-api-" in n)


def test_tls_http2_redirect_client_address_and_rotation(env, tmp_path, monkeypatch):
    ca = make_test_ca(tmp_path / "ca", (env.host.address, "localhost"))
    cert = tmp_path / "tls.pem"
    cert.write_text((ca / "server.pem").read_text())
    monkeypatch.setenv("ALBERT_TLS_CERT", str(cert))
    tls = '[edge]\ntls = "file"\nredirect_port = 18482\n'
    env.write(MODEL, api_port=18481, extra=tls)
    deploy_env(env.spec(), quiet=True)
    url, cacert = f"https://{env.host.address}:18481", str(ca / "ca.pem")
    # the openai client over TLS, trusting the test CA only
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none",
                    http_client=httpx.Client(verify=cacert, timeout=20))
    answer = client.chat.completions.create(model="m-a", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "echo: hi"
    # curl: HTTP/2 negotiated (ALPN), a client-sent X-Forwarded-For is overwritten
    out = subprocess.run(["curl", "-s", "--http2", "--cacert", cacert, "-o", "/dev/null", "-w",
                          "%{http_version} %{http_code}", "-H", "X-Forwarded-For: 6.6.6.6",
                          f"{url}/v1/models"], capture_output=True, text=True, timeout=20).stdout
    assert out == "2 200"
    # plain HTTP on the redirect port: 308 to HTTPS
    r = httpx.get(f"http://{env.host.address}:18482/v1/models", timeout=10)
    assert r.status_code == 308 and r.headers["location"] == f"{url}/v1/models"
    if env.runtime == "venv":  # the real gateway (the docker tests' api image is a fake one)
        clients: set = set()
        for _ in range(20):  # the access log is flushed about every second
            log = gateway_log(env)
            records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
            clients = {r.get("client") for r in records if r.get("path") == "/v1/models"}
            if clients:
                break
            time.sleep(0.5)
        assert clients == {_peer_of(env.host.address)} and "6.6.6.6" not in log
    # a bad certificate: refused by the preflight, the front door still serves the old one
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n")
    monkeypatch.setenv("ALBERT_TLS_CERT", str(tmp_path / "bad.pem"))
    with pytest.raises(AlbertError, match="haproxy refused the front door's config"):
        deploy_env(env.spec(), quiet=True)
    assert httpx.get(f"{url}/health", verify=cacert, timeout=10).status_code == 200
    # rotation: a new certificate is a reload; an open keep-alive connection keeps working
    monkeypatch.setenv("ALBERT_TLS_CERT", str(cert))
    with httpx.Client(verify=cacert, timeout=20) as kept:
        assert kept.post(f"{url}/v1/chat/completions", json=BODY).status_code == 200
        make_test_ca(tmp_path / "ca", (env.host.address, "localhost"))
        cert.write_text((ca / "server.pem").read_text())
        (res,) = deploy_env(env.spec(), quiet=True)
        assert res.status == "deployed", res.error
        for _ in range(20):
            assert kept.post(f"{url}/v1/chat/completions", json=BODY).status_code == 200
    new_serial = subprocess.run(
        f"openssl s_client -connect {env.host.address}:18481 -CAfile {cacert} </dev/null 2>/dev/null"
        " | openssl x509 -noout -serial", shell=True, capture_output=True, text=True).stdout
    local_serial = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(ca / "server.crt")],
                                  capture_output=True, text=True).stdout
    assert new_serial and new_serial == local_serial
    down_env(env.spec())


def _peer_of(address: str) -> str:
    """This test process's address as the host sees it (the link's other end)."""
    out = subprocess.run(["ip", "-o", "route", "get", address], capture_output=True, text=True).stdout
    return out.split(" src ", 1)[1].split()[0]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)

