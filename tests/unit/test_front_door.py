"""The front door's builders (issue 16): the HAProxy config from the environment, the switch,
the preflight check run for real against the machine's haproxy (``haproxy -c``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyalbert.commands import edge as edge_cmd
from pyalbert.config import load_spec
from pyalbert.devtools.test_ca import make_test_ca
from pyalbert.errors import AlbertError
from pyalbert.remote import Result
from pyalbert.runtimes.base import DeployInputs
from pyalbert.runtimes.checks import HostFacts
from pyalbert.runtimes.edge import HaproxyAccepts, edge_unit

ENV = """
[deploy]
base_dir = "/srv/albert"
[api]
port = 8443
max_body_bytes = 2000000
[[hosts]]
name = "h"
address = "10.0.0.1"
"""
TLS = '[edge]\ntls = "file"\nredirect_port = 8080\nstream_timeout_s = 7200\n'
HOST = HostFacts("gitlab", "test", "/srv/albert", lambda: set())
needs_haproxy = pytest.mark.skipif(not shutil.which(edge_cmd.HAPROXY_BIN), reason="no haproxy here")


def spec(config_factory, extra: str = ""):
    config_factory.env(ENV + extra)
    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    return load_spec("test", config_factory.root).env


def unit(env, runtime="venv", cert: str | None = None):
    secrets = {"tls_cert": cert} if cert else {}
    return edge_unit(env, runtime, DeployInputs(release_id="r1", secrets=secrets), "/srv/albert/releases/r1",
                     albert="/srv/albert/tools/bin/albert", state="/srv/albert/run-test")


def test_plain_config_both_colours_limits_and_forwarded_for(config_factory):
    _, files, _ = unit(spec(config_factory))
    cfg = next(f.content for f in files if f.path.endswith("haproxy.cfg"))
    assert "    bind 0.0.0.0:8443\n" in cfg and " ssl " not in cfg
    # each colour on its unix socket (no loopback TCP), health-checked there
    assert "server blue unix@/srv/albert/edge-test/sockets/blue.sock check inter 1s" in cfg
    assert "server green unix@/srv/albert/edge-test/sockets/green.sock check inter 1s" in cfg
    assert "gt 2000000 }" in cfg and "tune.bufsize 33792" in cfg  # [api] limits at the door
    assert "http-request set-header X-Forwarded-For %[src]" in cfg  # overwritten, never appended
    assert "stats socket /srv/albert/edge-test/haproxy.sock mode 600 level admin" in cfg


def test_tls_config_h2_redirect_and_secret_certificate(config_factory):
    edge, files, (check,) = unit(spec(config_factory, TLS), cert="CERT AND KEY")
    by_name = {f.path.rsplit("/", 1)[1]: f for f in files}
    cfg = by_name["haproxy.cfg"].content
    assert ("bind 0.0.0.0:8443 ssl crt /srv/albert/edge-test/config/cert.pem alpn h2,http/1.1"
            in cfg)
    assert ("bind 0.0.0.0:8080\n    http-request redirect location "
            "https://%[req.hdr(host),regsub(:[0-9]+$,)]:8443%[capture.req.uri] code 308") in cfg
    assert "ssl-min-ver TLSv1.2" in cfg and "timeout server 7200s" in cfg
    assert by_name["cert.pem"].secret and by_name["cert.pem"].content == "CERT AND KEY\n"
    assert "CERT AND KEY" not in check.cmd.display() and "CERT AND KEY" not in edge.start.display()
    # a new certificate is a reload (files digest), never a restart (config hash)
    rotated, _, _ = unit(spec(config_factory, TLS), cert="NEW CERT")
    assert rotated.config_hash == edge.config_hash and rotated.reload.digest != edge.reload.digest
    assert edge.start.render().startswith(
        "mkdir -p /srv/albert/edge-test /srv/albert/edge-test/sockets && ln -sfn")
    assert edge.reload.apply.render().endswith(
        "/srv/albert/tools/bin/albert supervise signal albert-test-api USR2 --state-dir /srv/albert/run-test")


def test_redirect_without_tls_is_refused(config_factory):
    with pytest.raises(AlbertError, match="redirect_port"):
        spec(config_factory, "[edge]\nredirect_port = 8080\n")


def test_switch_is_one_runtime_api_batch():
    cmd = edge_cmd.switch("/e/haproxy.sock", "/e/servers.state", "/e/upstream", "blue", 20887, ("green",))
    assert cmd.tokens[:2] == ("python3", "-c") and cmd.tokens[3:] == (
        "/e/haproxy.sock", "set server api/blue state ready; set server api/blue health up; set server api/green state maint",
        "/e/servers.state", "/e/upstream", "20887")


def run(check: HaproxyAccepts) -> Result:
    cmd = check.cmd
    stdin = cmd.stdin.value if hasattr(cmd.stdin, "value") else cmd.stdin
    res = subprocess.run(cmd.render(), shell=True, input=stdin, capture_output=True, text=True)
    return Result(cmd, res.returncode, res.stdout, res.stderr)


@needs_haproxy
def test_haproxy_check_accepts_a_good_certificate_and_names_a_bad_one(config_factory, tmp_path):
    pem = (make_test_ca(tmp_path / "ca") / "server.pem").read_text()
    env = spec(config_factory, TLS)
    _, _, (good,) = unit(env, cert=pem)
    assert run(good).ok and good.judge(run(good), HOST) is None
    _, _, (bad,) = unit(env, cert="-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----")
    verdict = bad.judge(run(bad), HOST)
    assert verdict is not None and verdict.startswith("haproxy refused the front door's config")
    assert "nothing was changed" in verdict and "ALBERT_TLS_CERT" in verdict



def test_venv_colours_serve_their_socket_and_share_one_config_hash(config_factory):
    from pyalbert.config import resolve_placement
    from pyalbert.engine.host_plans import deploy_plans

    config_factory.env('runtime = "venv"\n' + ENV)
    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    (plan,) = deploy_plans(resolve_placement(load_spec("test", config_factory.root)),
                           DeployInputs(release_id="r1"))
    swap = next(u for u in plan.units if hasattr(u, "colours"))
    blue, green = swap.colours["blue"].start.render(), swap.colours["green"].start.render()
    assert "--port 24886 --uds /srv/albert/edge-test/sockets/blue.sock --workers 1" in blue
    assert "--port 24887 --uds /srv/albert/edge-test/sockets/green.sock --workers 1" in green
    assert swap.colours["blue"].config_hash == swap.colours["green"].config_hash


def edge_switching(running: bool, same_hash: bool, files_changed: bool, reload_fails: bool = False):
    """The engine's front-door switch on a stub host: what ran (with its check flag), the
    undo steps too when it failed."""
    from types import SimpleNamespace

    from pyalbert.engine.host import HostDeploy

    ran: list[tuple[str, bool]] = []
    s = HostDeploy.__new__(HostDeploy)
    s.undo, s.hp, s.say = [], SimpleNamespace(release_id="r2"), lambda *a, **k: None
    s.r = SimpleNamespace(run=lambda cmd, check=True: ran.append((str(cmd), check)))
    s._reads_other_files = lambda u: files_changed

    def reload(u):
        ran.append(("reload", True))
        if reload_fails:
            raise AlbertError("the new worker did not come up")
    s._reload, s.wait_port = reload, lambda u: ran.append(("wait port", True))
    edge = SimpleNamespace(name="albert-e-edge", port=443, config_hash="new", reload=object(),
                           files=(), stop="stop edge", start="start edge")
    swap = SimpleNamespace(edge=edge, switch=lambda colour: f"switch {colour}",
                           upstream_file="/srv/edge-e/upstream")
    state = SimpleNamespace(running=running, config_hash="new" if same_hash else "old",
                            release="r1")
    try:
        s._switch_edge(swap, "green", state, live="blue")
    except AlbertError:
        for step in reversed(s.undo):  # what the engine's rollback runs
            step()
    return ran


def test_a_front_door_is_switched_before_it_reloads_and_switched_back_on_failure():
    """New requests go to the new colour on the running worker first: the worker a reload starts
    loads that state, so it never routes to the old colour at an address of the new config (the
    old colour, older code, may not listen there: the gateway's first unix socket). A failed
    reload switches back before the new colour stops."""
    ran = edge_switching(running=True, same_hash=True, files_changed=True)
    assert ran == [("switch green", False), ("reload", True), ("switch green", True)]
    ran = edge_switching(running=True, same_hash=True, files_changed=True, reload_fails=True)
    assert [c for c, _ in ran] == ["switch green", "reload", "switch blue"]


def test_an_unchanged_front_door_is_switched_once_and_a_new_one_after_it_starts():
    ran = edge_switching(running=True, same_hash=True, files_changed=False)
    assert ran == [("switch green", True)]
    ran = edge_switching(running=True, same_hash=False, files_changed=False)
    assert [c for c, _ in ran][0] == "switch green" and ran[-1] == ("switch green", True)
    assert [c for c, _ in ran].index("start edge") < len(ran) - 1
    ran = edge_switching(running=False, same_hash=False, files_changed=False)
    assert [c for c, _ in ran if c.startswith("switch")] == ["switch green"]
    assert ran[-1] == ("switch green", True)
