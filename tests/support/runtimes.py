"""Both runtimes behind one harness, for scenario tests parametrised over them.

``runtime_host`` (module scope, params ``docker`` and ``venv``): a namespace host ready to run
units of that runtime: dockerd with the fake vLLM image loaded, or no Docker and the tools venv
the real setup stage installs (``setup_env`` once) plus a stdlib venv whose ``python -m vllm...``
is the fake vLLM server. ``make_env(runtime_host, ...)`` gives an :class:`Env` of either kind with
the same methods: ``write`` the config, ``spec``, ``get``, ``running`` (unit -> config hash).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pyalbert.config import load_spec
from tests.support.hosts import environment_toml, ssh_environ
from tests.support.images import HAPROXY_IMAGE, ensure_haproxy_image

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/albert-test")
#: one per checkout: its .pth points into the checkout, and several checkouts (a clone under /tmp
#: made by test_clone_anywhere, a second worktree) may run tests at once
FAKE_VENV = CACHE / f"fake-vllm-venv-{hashlib.sha256(str(REPO).encode()).hexdigest()[:10]}"
STORAGE = Path("/var/tmp/albert-runtime-tests/models")
TOOLS_BASE = "/home/gitlab/albert-vt-tools"
RUNTIMES = ("docker", "venv")
#: a KV cache no host has RAM for twice: the engine restarts a changed server in place
NO_ROOM_KV_GIB = "100000"


def fake_vllm_python() -> str:
    """A stdlib venv whose ``python -m vllm.entrypoints.openai.api_server`` is the fake server."""
    python = FAKE_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(FAKE_VENV)],
                       check=True, capture_output=True, timeout=60)
    site = next((FAKE_VENV / "lib").glob("python3*/site-packages"))
    (site / "albert_fake_vllm.pth").write_text(f"{REPO / 'tests/support/fake_vllm'}\n")
    for path in (CACHE, FAKE_VENV):
        path.chmod(0o755)
    return str(python)


@dataclass(frozen=True)
class RuntimeHost:
    runtime: str
    host: object
    #: the fake vLLM image (docker) or interpreter (venv)
    vllm: str


def environment_text(rh: RuntimeHost, name: str, *, base: str, models: dict, api_port: int,
                     timeout: float, vllm_env: dict | None, extra: str, python: str | None,
                     hosts: tuple = ()) -> str:
    """``hosts``: every host of the environment (default: ``rh``'s alone)."""
    for model_id in models:
        (STORAGE / model_id).mkdir(parents=True, exist_ok=True)
    STORAGE.parent.chmod(0o755)
    # the storage dir is root's here; on a host, `fab provision` makes it the deploy user's: the
    # compile cache folder in it is the deploy user's either way (it makes one tree per vLLM)
    cache = STORAGE / ".vllm-cache"
    cache.mkdir(exist_ok=True)
    shutil.chown(cache, "gitlab", "gitlab")
    # no room for a second server unless a test asks for it (a model's env with
    # VLLM_CPU_KVCACHE_SPACE=0): the scenarios were written for a replace in place
    environ = {"VLLM_CPU_KVCACHE_SPACE": NO_ROOM_KV_GIB, **(vllm_env or {})}
    env_line = json.dumps(environ).replace('": ', '" = ')
    if rh.runtime == "docker":
        runtime = (f'[images]\nvllm = "{rh.vllm}"\napi = "{rh.vllm}"\nedge = "{HAPROXY_IMAGE}"\n'
                   f"[vllm]\nenv = {env_line}\n")
    else:
        runtime = (f'runtime = "venv"\n[vllm]\npython = "{python or rh.vllm}"\n'
                   f"env = {env_line}\n")
    return environment_toml(list(hosts) or [rh.host], f"""
storage_dir = "{STORAGE}"
{runtime}
[api]
port = {api_port}
[deploy]
ready_timeout_s = {timeout}
keep_releases = 3
base_dir = "{base}"
{extra}""")


def tools_on(rh_host, python: str, root: Path) -> None:
    """Install the tools venv on the host with the real setup stage (``fab setup``)."""
    from pyalbert.engine.setup import setup_env

    rh = RuntimeHost("venv", rh_host, python)
    (root / "environments").mkdir(parents=True, exist_ok=True)
    (root / "llm_routing_table.json").write_text(json.dumps({"m-a": {"model": "org/a", "port": 18300}}))
    (root / "environments" / "vttools.toml").write_text(environment_text(
        rh, "vttools", base=TOOLS_BASE, models={"m-a": {}}, api_port=18380, timeout=20,
        vllm_env=None, extra="", python=None))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ssh_environ([rh_host], root).items():
            mp.setenv(key, value)
        outcomes = setup_env(load_spec("vttools", root), service="api")
    errors = [f"{o.host}: {o.error}" for o in outcomes if o.error]
    assert not errors, errors


def make_runtime_host(runtime: str, make_host, tmp_path_factory) -> RuntimeHost:
    if runtime == "docker":
        from tests.support.fake_vllm.image import ensure_fake_vllm_image

        image = ensure_fake_vllm_image()
        h = make_host(docker=True)
        h.load_image(image)
        h.load_image(ensure_haproxy_image())  # the front door (images.edge)
        return RuntimeHost("docker", h, image)
    python = fake_vllm_python()
    h = make_host(docker=False)
    tools_on(h, python, tmp_path_factory.mktemp("venv-tools-config"))
    return RuntimeHost("venv", h, python)


class Env:
    """One test environment on a runtime host: write config, deploy, look, clean up.

    ``others``: more hosts of the same runtime in the environment (``host`` is the first)."""

    def __init__(self, rh: RuntimeHost, root: Path, monkeypatch, name: str,
                 others: tuple[RuntimeHost, ...] = ()):
        self.rh, self.host, self.root, self.name = rh, rh.host, root, name
        self.hosts = (rh.host, *(o.host for o in others))
        self.runtime = rh.runtime
        self.base = f"/home/gitlab/albert-{name}"
        self.state = f"{self.base}/run-{name}"
        (root / "environments").mkdir(parents=True, exist_ok=True)
        for key, value in ssh_environ(list(self.hosts), root).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("ALBERT_READY_POLL_S", "0.2")
        # venv: the tools venv `fab setup` installed, shared by every test
        for host in self.hosts if self.runtime == "venv" else ():
            host.run(f"mkdir -p {self.base} && ln -sfn {TOOLS_BASE}/tools {self.base}/tools && "
                     f"chown -h gitlab: {self.base} {self.base}/tools")

    def write(self, models: dict, *, api_port: int, timeout: float = 20, extra: str = "",
              vllm_env: dict | None = None, python: str | None = None) -> None:
        self.api_port = api_port
        (self.root / "llm_routing_table.json").write_text(json.dumps(models))
        (self.root / "environments" / f"{self.name}.toml").write_text(environment_text(
            self.rh, self.name, base=self.base, models=models, api_port=api_port, timeout=timeout,
            vllm_env=vllm_env, extra=extra, python=python, hosts=self.hosts))

    def spec(self):
        return load_spec(self.name, self.root)

    def get(self, port: int, path: str) -> httpx.Response:
        if port != getattr(self, "api_port", None):
            return self.on_host("GET", port, path)
        return httpx.get(f"http://{self.host.address}:{port}{path}", timeout=5)

    def chat(self, port: int, model: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        if port != getattr(self, "api_port", None):
            r = self.on_host("POST", port, "/v1/chat/completions", json.dumps(body))
        else:
            r = httpx.post(f"http://{self.host.address}:{port}/v1/chat/completions", timeout=10,
                           json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    @property
    def header_file(self) -> str:
        """The servers' key as a curl header file, where the deploy left it on the host."""
        return f"{self.base}/auth-{self.name}/vllm.header"

    def on_host(self, method: str, port: int, path: str, body: str | None = None) -> httpx.Response:
        """A model server listens on the host's loopback and needs its key (issue 14): ask it
        from the host, with the key's header file (``000``: an httpx.ConnectError, as directly)."""
        from pyalbert.commands.health import http_call, parse_http_call

        url = f"http://127.0.0.1:{port}{path}"
        header = self.header_file
        exists = not self.host.run(["test", "-e", header], check=False).returncode
        cmd = http_call(method, url, body=body, header_file=header if exists else None, timeout_s=10)
        out = self.host.run(cmd.render(), input=cmd.stdin_text, check=False, timeout=30)
        status, text = parse_http_call(out.stdout)
        request = httpx.Request(method, url)
        if status == 0:
            raise httpx.ConnectError(f"{url} on {self.host.name}: {out.stderr.strip()}",
                                     request=request)
        return httpx.Response(status, content=text.encode(), request=request)

    def supervised(self, host=None) -> dict[str, dict]:
        """venv: name -> supervisor state of the processes running now (the host's files;
        ``host``: another host of the environment)."""
        out = (host or self.host).run(f"cat {self.state}/*.json 2>/dev/null || true").stdout
        return {s["name"]: s for s in json_objects(out) if s.get("state") in ("running", "restarting")}

    def running(self, host=None) -> dict[str, str]:
        """Units of this env running now: name -> config hash."""
        if self.runtime == "venv":
            return {n: s["labels"]["albert.config-hash"] for n, s in self.supervised(host).items()}
        out = (host or self.host).run(["docker", "ps", "--filter", f"label=albert.env={self.name}",
                                       "--format", '{{.Names}} {{.Label "albert.config-hash"}}']).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


def json_objects(text: str) -> list[dict]:
    decoder, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        obj, end = decoder.raw_decode(text, i)
        out.append(obj)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return out


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime_host(request, make_host, tmp_path_factory) -> RuntimeHost:
    return make_runtime_host(request.param, make_host, tmp_path_factory)


@pytest.fixture
def env(runtime_host, tmp_path, monkeypatch, request):
    """An environment of this test on the runtime host (its own name, base dir and ports)."""
    from pyalbert.engine.operations import down_env

    test = request.node.originalname.replace("test_", "").replace("_", "")[:19].lower()
    e = Env(runtime_host, tmp_path / "config", monkeypatch, runtime_host.runtime[0] + test)
    yield e
    with contextlib.suppress(Exception):  # the host is torn down at the end anyway
        down_env(e.spec())
