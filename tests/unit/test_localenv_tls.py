"""The local environment speaks HTTPS with a test CA made once by ``albert local up``: the CA and
server certificate are reused on a second run (nothing changes), the certificate reaches the deploy
as the ``tls_cert`` File variable, and the printed curl/openai examples work as printed against a
TLS server trusting only that CA."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509

from pyalbert.devtools.localenv import LocalEnv
from pyalbert.devtools.test_ca import ensure_test_ca, make_test_ca, server_cert_fits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def local(tmp_path, monkeypatch):
    monkeypatch.delenv("ALBERT_TLS_CERT", raising=False)
    return LocalEnv(state=tmp_path)


def sans(cert_file: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in alt}


def test_the_first_run_makes_the_ca_and_certificate_the_second_changes_nothing(local, tmp_path):
    assert local.ensure_tls() == ["test CA", "server certificate"]
    tls = tmp_path / "tls"
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    assert sans(tls / "server.crt") >= {"10.210.0.2", "localhost", "127.0.0.1"}
    assert {p.name: p.stat().st_mode & 0o777 for p in tls.iterdir()} == {
        "ca.pem": 0o644, "ca.key": 0o600, "server.crt": 0o644, "server.key": 0o600, "server.pem": 0o600}
    # handed over as a File variable would be: the variable names the file
    assert os.environ["ALBERT_TLS_CERT"] == str(tls / "server.pem")
    assert local.spec.env.secrets["tls_cert"].resolve().get_secret_value().strip() == (tls / "server.pem").read_text().strip()
    assert local.ensure_tls() == []
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before


def test_a_certificate_that_no_longer_fits_is_made_again_under_the_same_ca(tmp_path):
    folder = tmp_path / "tls"
    make_test_ca(folder, ("10.210.0.2",), days=10)  # expires within the month: renewed
    ca = (folder / "ca.pem").read_bytes()
    assert not server_cert_fits(folder, ("10.210.0.2",))
    assert ensure_test_ca(folder, ("10.210.0.2",)) == ["server certificate"]
    assert server_cert_fits(folder, ("10.210.0.2",))
    assert ensure_test_ca(folder, ("10.210.0.2", "localhost")) == ["server certificate"]  # a new name
    assert sans(folder / "server.crt") == {"10.210.0.2", "localhost"}
    assert (folder / "ca.pem").read_bytes() == ca
    (folder / "ca.pem").unlink()  # another CA: the certificate no longer chains to it
    assert ensure_test_ca(folder, ("10.210.0.2", "localhost")) == ["test CA", "server certificate"]
    left = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes()).not_valid_after_utc
    assert left - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=30)


def test_plain_http_environment_makes_no_ca(tmp_path, monkeypatch):
    config = tmp_path / "config"
    shutil.copytree(REPO / "config", config)
    toml = config / "environments" / "local.toml"
    text = toml.read_text().replace('tls = "file"\nredirect_port = 8000\n', "")
    toml.write_text(text.replace("https://", "http://"))
    env = LocalEnv(config, state=tmp_path / "state")
    assert env.ensure_tls() == [] and env.ca_file is None
    assert "--cacert" not in env.examples() and "curl -s http://10.210.0.2:8080/v1/models" in env.examples()


def test_the_smoke_test_trusts_the_ca_only_while_it_runs(local, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    seen = []
    monkeypatch.setattr("pyalbert.cli.main", lambda argv: seen.append(os.environ["SSL_CERT_FILE"]) or 0)
    local._smoke()
    assert seen == [str(local.tls_dir / "ca.pem")]
    assert os.environ["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"


class FakeApi(BaseHTTPRequestHandler):
    """Just enough of the api for the examples: /v1/models and a chat completion, key checked."""

    def do_GET(self):
        self.answer({"object": "list", "data": [{"id": "smollm2-135m", "object": "model",
                                                 "created": 0, "owned_by": "albert"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.answer({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                         "role": "assistant", "content": "echo: " + body["messages"][0]["content"]}}]})

    def answer(self, payload):
        ok = self.headers.get("Authorization") == "Bearer the-key"
        data = json.dumps(payload if ok else {"error": "bad key"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_printed_examples_work_as_printed_over_https(local, tmp_path, monkeypatch, capsys):
    """The printed lines, run by bash from the checkout, against a TLS server on 127.0.0.1 that
    serves the local env's certificate: curl and the openai client trust the test CA."""
    local.ensure_tls()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(local.tls_dir / "server.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "api-key").write_text("the-key\n")
    try:
        port = server.server_address[1]
        script = local.examples().replace("https://10.210.0.2:8080", f"https://127.0.0.1:{port}")
        script = script.replace(".venv/bin/python", sys.executable)
        assert "PRIVATE KEY" not in script and f"--cacert {local.tls_dir / 'ca.pem'}" in script
        env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "CURL_CA_BUNDLE")}
        run = subprocess.run(["bash", "-euc", script], cwd=REPO, capture_output=True, text=True,
                             timeout=60, env=env)
        assert run.returncode == 0, run.stderr
        decoder, out = json.JSONDecoder(), run.stdout  # curl's answers, then the client's line
        models, end = decoder.raw_decode(out)
        chat, end2 = decoder.raw_decode(out, end)
        assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
        assert chat["choices"][0]["message"]["content"] == "echo: Bonjour !"
        assert out[end2:].strip() == "echo: Bonjour !"
        # without the CA, curl refuses the certificate (the examples' --cacert is what makes it work)
        bare = subprocess.run(["curl", "-s", "-o", "/dev/null", f"https://127.0.0.1:{port}/v1/models"],
                              capture_output=True, timeout=30, env=env)
        assert bare.returncode == 60  # peer certificate cannot be authenticated with known CAs
    finally:
        server.shutdown()
    local.print_usage()
    printed = capsys.readouterr().out
    assert local.examples().splitlines()[1] in printed and "PRIVATE KEY" not in printed
    assert f"export ALBERT_TLS_CERT={local.tls_dir / 'server.pem'}" in printed
