"""Nothing bypasses the gateway (issue 14): model servers listen on loopback or a private address,
require a key of their own, and only the gateway sends it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyalbert.api.upstream import Pool
from pyalbert.config import load_spec, resolve_placement
from pyalbert.engine import vllm_key
from pyalbert.engine.host_plans import deploy_plans, manifest, units_from_manifest
from pyalbert.errors import AlbertError
from pyalbert.runtimes.base import ApiSwap, DeployInputs, Unit

KEY = "albert-vllm-0123456789abcdef"

ONE_HOST = """
[deploy]
base_dir = "/srv/albert"
[[hosts]]
name = "gpu-1"
address = "203.0.113.7"
gpus = 1
"""

SPLIT = """
[deploy]
base_dir = "/srv/albert"
[[hosts]]
name = "gpu-1"
address = "203.0.113.7"
private_address = "10.1.0.7"
gpus = 1
services = ["vllm"]
[[hosts]]
name = "front"
address = "203.0.113.8"
services = ["api"]
"""


def placement(config_factory, hosts: str, runtime: str = "docker"):
    extra = 'runtime = "venv"\n[vllm]\npython = "/usr/bin/python3"\n' if runtime == "venv" else ""
    config_factory.env(extra + hosts)
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
    return resolve_placement(load_spec("test", config_factory.root))


def inputs(key: str | None = KEY, **kw):
    secrets = {"hf_token": "hf_x", **({"vllm_api_key": key} if key else {})}
    return DeployInputs(release_id="20250101-000000-abcdef", secrets=secrets,
                        config_files={"llm_routing_table.json": "{}"}, **kw)


def everything(hps) -> str:
    """Every command of the plans as the dry-run and the logs show them."""
    out = []
    for hp in hps:
        out += [f.cmd().display() for f in hp.files]
        for u in hp.units:
            units = [u.edge, *u.colours.values()] if isinstance(u, ApiSwap) else [u]
            for one in units:
                out += [one.start.display(), one.start.render(), *(f.cmd().display() for f in one.files)]
                if one.ready:
                    out += [one.ready.health().render(), one.ready.models().render()]
    return "\n".join(out)


FAKE_VLLM = Path(__file__).resolve().parents[1] / "support" / "fake_vllm"


@contextlib.contextmanager
def keyed_server(key: str):
    """The fake vLLM with ``$VLLM_API_KEY`` set, on a free loopback port: its base URL."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
         "--port", str(port), "--model", "/m", "--served-model-name", "m"],
        env={**os.environ, "PYTHONPATH": str(FAKE_VLLM), "VLLM_API_KEY": key},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


# --- where servers listen ----------------------------------------------------------------------

def test_servers_listen_on_loopback_when_every_gateway_is_on_their_host(config_factory):
    plan = placement(config_factory, ONE_HOST)
    assert plan.backends == {"small": ["http://127.0.0.1:8001"]}
    unit = deploy_plans(plan, inputs())[0].units[0]
    assert " -p 127.0.0.1:8001:8001 " in unit.start.render()
    assert (unit.ready.host, unit.ready.port) == ("127.0.0.1", 8001)


def test_servers_listen_on_the_private_address_a_remote_gateway_uses(config_factory):
    plan = placement(config_factory, SPLIT)
    assert plan.backends == {"small": ["http://10.1.0.7:8001"]}
    unit = deploy_plans(plan, inputs())[0].units[0]
    assert " -p 10.1.0.7:8001:8001 " in unit.start.render()
    assert unit.ready.host == "10.1.0.7"


def test_private_address_defaults_to_address(config_factory):
    plan = placement(config_factory, SPLIT.replace('private_address = "10.1.0.7"\n', ""))
    assert plan.backends == {"small": ["http://203.0.113.7:8001"]}


def test_venv_server_binds_the_same_address(config_factory):
    plan = placement(config_factory, SPLIT, runtime="venv")
    unit = deploy_plans(plan, inputs())[0].units[0]
    assert " --host 10.1.0.7 --port 8001 " in unit.start.render()
    plan = placement(config_factory, ONE_HOST, runtime="venv")
    unit = deploy_plans(plan, inputs())[0].units[0]
    assert " --host 127.0.0.1 --port 8001 " in unit.start.render()


# --- the key -----------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", ["docker", "venv"])
def test_key_is_in_the_0600_env_file_and_nowhere_on_a_command_line(config_factory, runtime):
    hps = deploy_plans(placement(config_factory, ONE_HOST, runtime), inputs())
    hp = hps[0]
    env_file = next(f for f in hp.files if f.path.endswith("albert-test-vllm-small.env"))
    assert env_file.secret and f"VLLM_API_KEY={KEY}" in env_file.content
    assert KEY not in everything(hps).replace(env_file.cmd().render(), "")
    assert "--api-key" not in everything(hps)
    # readiness and smoke read the key from a 0600 curl header file on the host
    unit = hp.units[0]
    (header,) = unit.files
    assert header.path == "/srv/albert/auth-test/vllm.header" and header.secret
    assert header.content == f"Authorization: Bearer {KEY}\n"
    assert unit.ready.models().render() == (
        "curl -s --max-time 3 -H @/srv/albert/auth-test/vllm.header "
        "http://127.0.0.1:8001/v1/models || true")
    assert unit.ready.health().render() == (
        "curl -s -o /dev/null -w '%{http_code}' --max-time 3 http://127.0.0.1:8001/health || true")


@pytest.mark.parametrize("runtime", ["docker", "venv"])
def test_gateway_gets_the_key_as_a_secret_file(config_factory, runtime):
    hp = deploy_plans(placement(config_factory, ONE_HOST, runtime), inputs())[0]
    swap = next(u for u in hp.units if isinstance(u, ApiSwap))
    key_file = next(f for f in hp.files if f.path.endswith("/upstream.key"))
    assert key_file.secret and key_file.content == KEY + "\n"
    blue = swap.colours["blue"].start.render()
    if runtime == "docker":
        assert ("-v /srv/albert/releases/20250101-000000-abcdef/upstream.key:"
                "/etc/albert/upstream.key:ro") in blue
        assert "--upstream-key /etc/albert/upstream.key" in blue
        assert "--network host" in blue and "--host 127.0.0.1 --port 24160" in blue
    else:
        assert "--upstream-key /srv/albert/releases/20250101-000000-abcdef/upstream.key" in blue


def test_a_new_key_changes_the_config_hash_once(config_factory):
    plan = placement(config_factory, ONE_HOST)
    a, b, c = (deploy_plans(plan, inputs(k))[0] for k in (KEY, KEY, "albert-vllm-other"))
    assert a.units[0].config_hash == b.units[0].config_hash != c.units[0].config_hash
    assert a.units[1].config_hash == b.units[1].config_hash != c.units[1].config_hash  # the api


def test_without_a_key_nothing_changes_for_readiness(config_factory):
    hp = deploy_plans(placement(config_factory, ONE_HOST), inputs(key=None))[0]
    assert hp.units[0].files == () and hp.units[0].ready.header_file is None
    assert not any(f.path.endswith("upstream.key") for f in hp.files)


def test_rollback_asks_readiness_where_the_release_listened(config_factory):
    hp = deploy_plans(placement(config_factory, SPLIT), inputs())[0]
    data = json.loads(json.dumps(manifest(hp, {}, who="me", when="t", previous=None)))
    (unit,) = [u for u in units_from_manifest(data, hp.runtime) if isinstance(u, Unit)]
    assert unit.ready == hp.units[0].ready
    assert unit.ready.host == "10.1.0.7" and unit.ready.header_file.endswith("vllm.header")


# --- where the key comes from ------------------------------------------------------------------

def env_spec(config_factory):
    config_factory.env(ONE_HOST)
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
    return load_spec("test", config_factory.root).env


def test_key_derives_from_the_ssh_key_per_environment(config_factory, tmp_path):
    env = env_spec(config_factory)
    key_file = tmp_path / "id"
    key_file.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n")
    from_path = vllm_key.resolve(env, {"SSH_PRIVATE_KEY": str(key_file)}, tmp_path / "state")
    from_content = vllm_key.resolve(env, {"SSH_PRIVATE_KEY": key_file.read_text()}, tmp_path / "s")
    assert from_path == from_content == vllm_key.derive(key_file.read_text().strip().encode(), "test")
    assert from_path.startswith("albert-vllm-") and len(from_path) == 12 + 64
    assert vllm_key.derive(b"k", "staging") != vllm_key.derive(b"k", "production")
    assert "abc" not in from_path and not (tmp_path / "state").exists()


def test_an_explicit_key_wins(config_factory, tmp_path):
    env = env_spec(config_factory)
    got = vllm_key.resolve(env, {"ALBERT_VLLM_API_KEY": "mine", "SSH_PRIVATE_KEY": "x"}, tmp_path)
    assert got == "mine"
    with pytest.raises(AlbertError, match="ALBERT_VLLM_API_KEY"):
        vllm_key.resolve(env, {"ALBERT_VLLM_API_KEY": "two words"}, tmp_path)


def test_without_ssh_key_a_key_is_generated_once_and_kept_0600(config_factory, tmp_path):
    env = env_spec(config_factory)
    first = vllm_key.resolve(env, {}, tmp_path / "state")
    assert first == vllm_key.resolve(env, {}, tmp_path / "state")
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "vllm-api-key-test").st_mode)
    assert mode == 0o600


# --- the gateway sends it ------------------------------------------------------------------------

def test_pool_sends_the_key_to_upstreams_only_as_a_header():
    pool = Pool("http://127.0.0.1:8001", api_key=KEY)
    assert pool.build(b"GET", b"/v1/models", None) == (
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:8001\r\nAuthorization: Bearer " + KEY.encode()
        + b"\r\n\r\n")
    assert b"Authorization" not in Pool("http://127.0.0.1:8001").build(b"GET", b"/x", None)
    with pytest.raises(ValueError):
        Pool("http://127.0.0.1:8001", api_key="a\r\nX-Evil: 1")


def test_gateway_reaches_a_keyed_upstream_and_is_refused_without_the_key(tmp_path):
    """Real vLLM's rule (401 on /v1/* without the key, /health open), the fake's, via the gateway."""
    import httpx

    from pyalbert.api.app import Gateway
    from pyalbert.api.settings import GatewaySettings
    key_file = tmp_path / "upstream.key"
    key_file.write_text(KEY + "\n")
    with keyed_server(KEY) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models").json() == {"error": "Unauthorized"}
        assert httpx.get(f"{url}/health").status_code == 200

        async def ask(settings) -> int:
            gw = Gateway(settings)
            transport = httpx.ASGITransport(app=gw)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                r = await client.post("/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": "hi"}]})
                await gw.router.close() if hasattr(gw.router, "close") else None
                return r.status_code

        base = GatewaySettings(backends={"m": (url,)}, open_access=True, access_log=False)
        assert asyncio.run(ask(base.with_(upstream_key_path=str(key_file)))) == 200
        assert asyncio.run(ask(base)) in (401, 502, 503)


def test_unreadable_upstream_key_file_names_the_fix(tmp_path):
    from pyalbert.api.app import Gateway
    from pyalbert.api.settings import GatewaySettings

    settings = GatewaySettings(backends={"m": ("http://127.0.0.1:1",)}, open_access=True,
                               upstream_key_path=str(tmp_path / "missing"))
    with pytest.raises(AlbertError, match="upstream key file .* redeploy"):
        Gateway(settings)


# --- albert smoke vllm: on the servers' hosts, with the key's header file --------------------------

def test_http_call_builder_keeps_key_and_body_off_the_command_line():
    from pyalbert.commands.health import http_call, parse_http_call

    cmd = http_call("POST", "http://127.0.0.1:8001/v1/chat/completions", body='{"model": "m"}',
                    header_file="/srv/albert/auth-test/vllm.header", timeout_s=5)
    assert cmd.render() == (
        "curl -s -S --max-time 5 -X POST -H @/srv/albert/auth-test/vllm.header "
        "-H 'Content-Type: application/json' --data-binary @- "
        "-w '\\n@albert-http-status %{http_code}' http://127.0.0.1:8001/v1/chat/completions")
    assert cmd.stdin_text == '{"model": "m"}'
    assert parse_http_call('{"a": 1}\n@albert-http-status 401') == (401, '{"a": 1}')
    assert parse_http_call("\n@albert-http-status 000") == (0, "")
    assert parse_http_call("garbage") == (0, "garbage")


def test_smoke_vllm_on_the_host_passes_with_the_key_and_fails_without(tmp_path):
    import httpx

    from pyalbert.remote import LocalRunner
    from pyalbert.smoke import HostTransport, VllmServer, VllmSmokeTarget, run_vllm_smoke

    good, bad = tmp_path / "good.header", tmp_path / "bad.header"
    good.write_text(f"Authorization: Bearer {KEY}\n")
    bad.write_text("Authorization: Bearer nope\n")
    runner = LocalRunner()

    def smoke(url: str, header) -> dict[str, str]:
        port = int(url.rsplit(":", 1)[1])
        srv = VllmServer(host="h1", address="127.0.0.1", port=port, model="m",
                         header_file=str(header) if header else None)
        target = VllmSmokeTarget(env="test", servers=(srv,), timeout_s=5, wait_s=5, max_tokens=4)
        ran = []
        transport = HostTransport(target.servers, lambda host, cmd: ran.append(cmd) or runner.run(
            cmd, check=False), timeout_s=5)
        with httpx.Client(transport=transport) as client:
            results = run_vllm_smoke(target, client, poll_s=0.1)
        assert all(KEY not in c.render() for c in ran)
        return {r.name.rsplit(" ", 1)[-1]: r.status + " " + r.detail for r in results}

    with keyed_server(KEY) as url:
        ok = smoke(url, good)
        assert [v.split()[0] for v in ok.values()] == ["passed"] * 3, ok
        refused = smoke(url, bad)
        assert refused["/health"].startswith("passed")
        assert "HTTP 401" in refused["/v1/models"] and "Unauthorized" in refused["/v1/models"]
        assert "HTTP 401" in refused["completion"]
        assert "HTTP 401" in smoke(url, None)["/v1/models"]


def test_status_asks_health_where_the_server_listens(config_factory):
    """``fab status`` on a host whose servers listen on its private address, not on loopback."""
    from pyalbert.engine.operations import status_env
    from pyalbert.remote import Result

    config_factory.env(SPLIT)
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
    spec = load_spec("test", config_factory.root)
    asked: list[str] = []

    class Host:
        def __init__(self, name: str):
            self.name = name

        def run(self, cmd, *, check=True, timeout=None):
            text = cmd.render()
            out = ""
            if text.startswith("docker ps") and self.name == "gpu-1":
                out = json.dumps({"Names": "albert-test-vllm-small", "State": "running",
                                  "Labels": "albert.service=vllm,albert.model=small"})
            elif "/health" in text:
                asked.append(text)
                out = "200"
            return Result(cmd, 0, out, "")

        def close(self):
            pass

    status_env(spec, runners=lambda host: Host(host.name))
    assert any("http://10.1.0.7:8001/health" in a for a in asked), asked
    assert not any("127.0.0.1:8001" in a for a in asked)
