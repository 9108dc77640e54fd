"""``[edge] tls = "acme"`` (issue 16): the config keys and their errors, lego's commands (whole
strings), the HAProxy config (challenge route, program, pidfile), the renewal script run for real
against a fake lego, the placeholder made by the host's openssl, ``haproxy -c`` of the lot."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from pyalbert.commands import acme
from pyalbert.commands import edge as edge_cmd
from pyalbert.config import load_spec
from pyalbert.errors import AlbertError
from pyalbert.remote import Result
from pyalbert.runtimes.base import DeployInputs
from pyalbert.runtimes.checks import HostFacts, PortFree
from pyalbert.runtimes.edge import HaproxyAccepts, acme_config, edge_unit, renew_now

ENV = """
[deploy]
base_dir = "/srv/albert"
[api]
port = 8443
[[hosts]]
name = "h"
address = "10.0.0.1"
"""
ACME = """[edge]
tls = "acme"
redirect_port = 80
acme_domains = ["api.example.org", "llm.example.org"]
acme_email = "ops@example.org"
"""
HOST = HostFacts("gitlab", "test", "/srv/albert", lambda: set())
LEGO = ("/usr/bin/lego --path /srv/albert/edge-test/acme --server "
        "https://acme-v02.api.letsencrypt.org/directory --accept-tos --email ops@example.org "
        "--domains api.example.org --domains llm.example.org --key-type ec256 --pem --http "
        "--http.port 127.0.0.1:8402")
needs_tools = pytest.mark.skipif(not (shutil.which(edge_cmd.HAPROXY_BIN) and shutil.which("openssl")),
                                 reason="no haproxy or openssl here")


def spec(config_factory, extra: str = ACME):
    config_factory.env(ENV + extra)
    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    return load_spec("test", config_factory.root).env


def unit(env, runtime="venv"):
    return edge_unit(env, runtime, DeployInputs(release_id="r1", secrets={}), "/srv/albert/releases/r1",
                     albert="/srv/albert/tools/bin/albert", state="/srv/albert/run-test")


@pytest.mark.parametrize("extra, named", [
    ('[edge]\ntls = "acme"\nredirect_port = 80\nacme_email = "a@b.org"\n', "needs acme_domains:"),
    ('[edge]\ntls = "acme"\nredirect_port = 80\nacme_domains = ["a.b.org"]\n', "needs acme_email:"),
    ('[edge]\ntls = "acme"\nacme_domains = ["a.b.org"]\nacme_email = "a@b.org"\n', "needs redirect_port:"),
    ('[edge]\ntls = "acme"\nredirect_port = 80\nacme_email = "a@b.org"\nacme_domains = ["10.0.0.1"]\n',
     "acme_domains holds 10.0.0.1"),
    ('[edge]\ntls = "acme"\nredirect_port = 80\nacme_email = "a@b.org"\nacme_domains = ["*.b.org"]\n',
     r"acme_domains holds \*.b.org"),
], ids=["no-domains", "no-email", "no-plain-port", "an-address", "a-wildcard"])
def test_acme_config_errors_name_the_key_and_fix(config_factory, extra, named):
    with pytest.raises(AlbertError, match=named):
        spec(config_factory, extra)


def test_lego_commands_whole_strings(config_factory):
    c = acme_config(spec(config_factory))
    assert acme.obtain(c).render() == f"{LEGO} run"
    assert acme.renew(c).render() == f"{LEGO} renew --days 30 --no-random-sleep"
    assert acme.renew(c, acme.FORCE_DAYS).render() == f"{LEGO} renew --days 100000 --no-random-sleep"
    test_ca = acme.AcmeConfig(**{**c.__dict__, "ca_file": "/etc/albert/pebble.pem",
                                 "directory": "https://10.0.0.9:14000/dir"})
    assert acme.obtain(test_ca).render().startswith(
        "env LEGO_CA_CERTIFICATES=/etc/albert/pebble.pem /usr/bin/lego --path /srv/albert/edge-test/acme "
        "--server https://10.0.0.9:14000/dir ")
    assert c.lego_pem == "/srv/albert/edge-test/acme/certificates/api.example.org.pem"


def test_haproxy_routes_challenges_to_lego_and_runs_the_loop(config_factory):
    edge, files, _ = unit(spec(config_factory))
    by_name = {f.path.rsplit("/", 1)[1]: f for f in files}
    cfg = by_name["haproxy.cfg"].content
    assert "bind 0.0.0.0:8443 ssl crt /srv/albert/edge-test/tls.pem alpn h2,http/1.1" in cfg
    assert (
        "    bind 0.0.0.0:80\n"
        "    # the CA's http-01 challenges (plain HTTP only) go to lego on the loopback, never redirected\n"
        "    acl acme_challenge path_beg /.well-known/acme-challenge/\n"
        "    use_backend acme if acme_challenge !{ ssl_fc }\n"
        "    http-request redirect location https://%[req.hdr(host),regsub(:[0-9]+$,)]:8443"
        "%[capture.req.uri] code 308 if !{ ssl_fc } !acme_challenge\n") in cfg
    assert "backend acme\n    timeout server 30s\n    server lego 127.0.0.1:8402\n" in cfg
    assert ("program acme\n    command 'sh' '/srv/albert/edge-test/config/acme-renew.sh' 'loop'\n" in cfg)
    assert "pidfile /srv/albert/edge-test/haproxy.pid" in cfg
    script = by_name["acme-renew.sh"].content
    assert f"if obtained; then {LEGO} renew --days 30 --no-random-sleep; else obtain; fi && install" in script
    assert f"{LEGO} run && echo \"$want\" > \"$for_file\"" in script
    assert "want='api.example.org llm.example.org'" in script
    # the placeholder comes before HAProxy, at start and at a reload
    assert "openssl req -x509" in edge.start.render().split("supervise start")[0]
    assert "openssl req -x509" in edge.reload.apply.render().split("supervise signal")[0]
    assert renew_now(spec(config_factory), "venv").render() == \
        "sh /srv/albert/edge-test/config/acme-renew.sh now"


def test_plain_tls_file_config_has_no_acme(config_factory):
    _, files, _ = unit(spec(config_factory, '[edge]\ntls = "file"\nredirect_port = 80\n'))
    cfg = next(f.content for f in files if f.path.endswith("haproxy.cfg"))
    assert "acme" not in cfg and "pidfile" not in cfg
    assert "%[capture.req.uri] code 308 unless { ssl_fc }\n" in cfg


def test_docker_mounts_lego_and_the_directory_ca(config_factory):
    env = spec(config_factory, ACME + 'acme_ca_file = "/etc/albert/pebble.pem"\n')
    edge, _, _ = unit(env, "docker")
    start = edge.start.render()
    for volume in ("/usr/bin/lego:/usr/bin/lego:ro", "/etc/ssl/certs:/etc/ssl/certs:ro",
                   "/etc/albert/pebble.pem:/etc/albert/pebble.pem:ro"):
        assert f"-v {volume}" in start
    assert renew_now(env, "docker").render() == \
        "docker exec albert-test-api sh /srv/albert/edge-test/config/acme-renew.sh now"


def test_preflight_checks_that_legos_port_is_free_naming_the_key(config_factory):
    _, _, checks = unit(spec(config_factory, ACME + "acme_port = 8499\n"))
    (port,) = [c for c in checks if isinstance(c, PortFree)]
    assert port.port == 8499 and port.cmd.render() == PortFree(8499, "x").cmd.render()
    taken = Result(port.cmd, 0, "LISTEN 0 4096 127.0.0.1:8499 0.0.0.0:* users:((\"nc\",pid=7,fd=3))\n", "")
    assert port.judge(taken, HOST) == (
        'port 8499 is already taken by another process (users:(("nc",pid=7,fd=3))), not by '
        "albert-test-api. Fix: stop that process, or set another [edge] acme_port in "
        "environments/test.toml.")
    ours = HostFacts("gitlab", "test", "/srv/albert", lambda: {"albert-test-api"})
    assert port.judge(taken, ours) is None and port.judge(Result(port.cmd, 0, "", ""), HOST) is None
    _, _, file_checks = unit(spec(config_factory, '[edge]\ntls = "file"\n'))
    assert not [c for c in file_checks if isinstance(c, PortFree)]


def test_second_render_is_identical(config_factory):
    env = spec(config_factory)
    (a, files_a, _), (b, files_b, _) = unit(env), unit(env)
    assert a.config_hash == b.config_hash and a.reload.digest == b.reload.digest
    assert [f.content for f in files_a] == [f.content for f in files_b]


def run(check: HaproxyAccepts) -> Result:
    cmd = check.cmd
    res = subprocess.run(cmd.render(), shell=True, input=cmd.stdin_text, capture_output=True, text=True)
    return Result(cmd, res.returncode, res.stdout, res.stderr)


@needs_tools
def test_haproxy_accepts_the_acme_config_with_a_placeholder(config_factory):
    _, _, checks = unit(spec(config_factory))
    (check,) = [c for c in checks if isinstance(c, HaproxyAccepts)]
    res = run(check)
    assert res.ok, res.stderr
    assert check.judge(res, HOST) is None


@needs_tools
def test_host_placeholder_is_made_once_and_is_a_pem_haproxy_reads(tmp_path):
    live = tmp_path / "edge" / "tls.pem"
    cmd = acme.ensure_placeholder(str(live))
    assert subprocess.run(cmd.render(), shell=True).returncode == 0
    first = live.read_text()
    assert "BEGIN CERTIFICATE" in first and "PRIVATE KEY" in first
    assert oct(live.stat().st_mode & 0o777) == "0o600"
    assert subprocess.run(cmd.render(), shell=True).returncode == 0
    assert live.read_text() == first  # present: left alone


FAKE_LEGO = """#!/bin/sh
# a fake lego: records its arguments, writes a PEM named after the call count
echo "$*" >> "$LOG"
n=$(wc -l < "$LOG")
dir=$(dirname "$PEM")
mkdir -p "$dir"
case " $* " in *" renew "*) [ -n "$RENEW_WRITES" ] || exit 0 ;; esac
echo "PEM $n" > "$PEM"; echo "CRT $n" > "$dir/$(basename "$PEM" .pem).crt"
"""


def test_renewal_script_obtains_installs_and_reloads_only_on_change(config_factory, tmp_path):
    """The real script with a fake lego: first ``run``, then ``renew`` (unchanged PEM: no
    reload), ``now`` forces a renewal and reloads; the reload is ``SIGUSR2`` to the pidfile's pid."""
    fake = tmp_path / "lego"
    fake.write_text(FAKE_LEGO)
    fake.chmod(0o755)
    c = acme.AcmeConfig(state_dir=str(tmp_path / "acme"), live_pem=str(tmp_path / "tls.pem"),
                        pid_file=str(tmp_path / "haproxy.pid"), domains=("api.example.org",),
                        email="ops@example.org", directory="https://ca.test/dir", port=8402,
                        binary=str(fake))
    script = tmp_path / "acme-renew.sh"
    script.write_text(acme.render_loop(c))
    # the "master": a sleeper that counts USR2
    master = subprocess.Popen(["python3", "-c", "import signal,sys,time\n"
                               "signal.signal(signal.SIGUSR2, lambda *a: print('USR2', flush=True))\n"
                               "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert master.stdout.readline() == "ready\n"
    (tmp_path / "haproxy.pid").write_text(f"{master.pid}\n")
    env = {**os.environ, "LOG": str(tmp_path / "calls"), "PEM": c.lego_pem, "RENEW_WRITES": ""}
    try:
        first = subprocess.run(["sh", str(script), "now"], env=env, capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        assert (tmp_path / "tls.pem").read_text() == "PEM 1\n"
        assert oct((tmp_path / "tls.pem").stat().st_mode & 0o777) == "0o600"
        again = subprocess.run(["sh", str(script), "now"], env=env, capture_output=True, text=True)
        assert again.returncode == 0 and "installed" not in again.stdout  # renew wrote nothing new
        forced = subprocess.run(["sh", str(script), "now"], env={**env, "RENEW_WRITES": "1"},
                                capture_output=True, text=True)
        assert forced.returncode == 0 and "installed a new certificate" in forced.stdout
        assert (tmp_path / "tls.pem").read_text() == "PEM 3\n"
    finally:
        master.send_signal(signal.SIGTERM)
        out, _ = master.communicate(timeout=10)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [line.split(" renew")[0].split()[-1] if " renew" in line else line.split()[-1]
            for line in calls] == ["run", "127.0.0.1:8402", "127.0.0.1:8402"]
    assert calls[1].endswith("renew --days 100000 --no-random-sleep")
    assert out.count("USR2") == 2  # the first certificate and the forced renewal, not the no-op
    # another name: a new certificate (lego's renew would keep the old names)
    more = acme.AcmeConfig(**{**c.__dict__, "domains": ("api.example.org", "llm.example.org")})
    script.write_text(acme.render_loop(more))
    (tmp_path / "haproxy.pid").unlink()  # the "master" is gone: signal no one
    subprocess.run(["sh", str(script), "now"], env=env, capture_output=True, text=True)
    last = (tmp_path / "calls").read_text().splitlines()[-1]
    assert last.endswith(" run") and "--domains llm.example.org" in last


def children(pid: int) -> dict[int, str]:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]): line.split(None, 1)[1] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    return bool(state.strip()) and not state.startswith("Z")


def wait_for(predicate, what: str):
    for _ in range(100):  # bounded: 10 s
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within 10 s: {what}")


@needs_tools
def test_haproxy_master_runs_the_loop_and_leaves_nothing_behind(tmp_path):
    """The loop as HAProxy's ``program``: a reload replaces it (SIGUSR1 to the old one), a stop
    ends it, and neither leaves its sleep behind (a failing fake lego: the loop waits to retry)."""
    fake = tmp_path / "lego"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    c = acme.AcmeConfig(state_dir=str(tmp_path / "acme"), live_pem=str(tmp_path / "tls.pem"),
                        pid_file=str(tmp_path / "haproxy.pid"), domains=("api.example.org",),
                        email="ops@example.org", directory="https://ca.test/dir", port=8402,
                        binary=str(fake))
    script = tmp_path / "acme-renew.sh"
    script.write_text(acme.render_loop(c))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"global\n    master-worker\n    pidfile {c.pid_file}\n\nprogram acme\n"
                   f"    command {acme.program_command(str(script))}\n\ndefaults\n    mode http\n"
                   "    timeout client 5s\n    timeout server 5s\n    timeout connect 1s\n\n"
                   f"frontend f\n    bind unix@{tmp_path}/f.sock\n    default_backend b\n\nbackend b\n"
                   "    server s 127.0.0.1:9\n")
    log = (tmp_path / "haproxy.log").open("w")
    master = subprocess.Popen(edge_cmd.serve_argv(str(cfg)), stdout=log, stderr=subprocess.STDOUT)
    try:
        def loop_and_sleep() -> tuple[int, int] | None:
            loops = [p for p, args in children(master.pid).items() if str(script) in args]
            sleeps = [p for p in loops for s in children(p) if s] if loops else []
            return (loops[0], next(iter(children(loops[0])))) if loops and sleeps else None

        old_loop, old_sleep = wait_for(loop_and_sleep, "the loop waits to retry")
        master.send_signal(signal.SIGUSR2)  # a reload: a new loop, the old one and its sleep end
        new_loop, new_sleep = wait_for(lambda: (r := loop_and_sleep()) and r[0] != old_loop and r,
                                       "a new loop after the reload")
        wait_for(lambda: not alive(old_loop) and not alive(old_sleep), "the old loop and its sleep end")
        master.send_signal(signal.SIGTERM)
        master.wait(10)
        wait_for(lambda: not alive(new_loop) and not alive(new_sleep), "the loop and its sleep end")
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(10)
        log.close()


PLACEHOLDER_OUT = ("subject=CN = albert-acme-placeholder\nissuer=CN = albert-acme-placeholder\n"
                   "notAfter=Dec  5 06:10:26 2036 GMT\n")
ISSUED_OUT = ("subject=CN = api.example.org\nissuer=C = US, O = Let's Encrypt, CN = R11\n"
              "notAfter=Mar  2 06:10:26 2027 GMT\n")


class Answers:
    """A runner whose answers to ``openssl x509`` come from a list, the last one repeated."""

    def __init__(self, *outputs: str):
        self.outputs, self.asked = list(outputs), []

    def run(self, cmd, check=True, **kw):
        self.asked.append(cmd.render())
        out = self.outputs.pop(0) if len(self.outputs) > 1 else self.outputs[0]
        return Result(cmd, 0 if out else 1, out, "" if out else "Unable to load certificate")


def test_certificate_fact_whole_command_and_parse():
    assert acme.certificate("/srv/albert/edge-test/tls.pem").render() == (
        "openssl x509 -noout -subject -issuer -enddate -in /srv/albert/edge-test/tls.pem")
    assert acme.parse_certificate(PLACEHOLDER_OUT).placeholder
    issued = acme.parse_certificate(ISSUED_OUT)
    assert issued == acme.Certificate("api.example.org", "R11", "Mar  2 06:10:26 2027 GMT")
    assert not issued.placeholder and acme.parse_certificate("") is None


def test_deploy_note_waits_bounded_for_the_first_certificate_then_names_it():
    from pyalbert.engine.edge_certificate import certificate_note

    slept = []
    runner = Answers("", PLACEHOLDER_OUT, PLACEHOLDER_OUT, ISSUED_OUT)
    note = certificate_note(runner, "/x/tls.pem", "test", "https://ca/dir", wait_s=10, poll_s=1,
                            sleep=slept.append)
    assert note == ("front door certificate: issued by R11 for api.example.org, valid until "
                    "Mar  2 06:10:26 2027 GMT")
    assert slept == [1, 1, 1] and len(runner.asked) == 4
    slept.clear()
    note = certificate_note(Answers(PLACEHOLDER_OUT), "/x/tls.pem", "test", "https://ca/dir", wait_s=3,
                            poll_s=1, sleep=slept.append)
    assert note.startswith("front door certificate: still the self-signed placeholder after 3 s: "
                           "the renewal loop keeps asking https://ca/dir") and slept == [1, 1, 1]
    assert "albert-test-api" in note


def test_deploy_report_notes_the_certificate_of_each_api_host_that_deployed(config_factory):
    from pyalbert.config.deployment import resolved
    from pyalbert.engine.edge_certificate import report_certificates
    from pyalbert.engine.report import HostResult, Printer

    config_factory.env(ENV + ACME)
    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    deployment = resolved(load_spec("test", config_factory.root))
    ok, failed = HostResult("h", status="deployed"), HostResult("h", status="failed")
    runners = []
    report_certificates(deployment, [ok], lambda host: runners.append(Answers(ISSUED_OUT)) or runners[-1],
                        Printer(quiet=True), wait_s=0)
    assert ok.notes == ["front door certificate: issued by R11 for api.example.org, valid until "
                        "Mar  2 06:10:26 2027 GMT"]
    assert runners[0].asked == ["openssl x509 -noout -subject -issuer -enddate -in /srv/albert/edge-test/tls.pem"]
    report_certificates(deployment, [failed], lambda host: Answers(ISSUED_OUT), Printer(quiet=True), wait_s=0)
    assert failed.notes == []


class Renewing(Answers):
    """The renewal script's answer (``exit``: its status), then ``openssl x509``'s."""

    def __init__(self, exit_code: int, said: str, *outputs: str):
        super().__init__(*outputs)
        self.exit_code, self.said = exit_code, said

    def run(self, cmd, check=True, **kw):
        if "acme-renew.sh" in cmd.render():
            self.asked.append(cmd.render())
            return Result(cmd, self.exit_code, self.said, "")
        return super().run(cmd, check, **kw)


@pytest.mark.parametrize("runtime, renew", [
    ("docker", "docker exec albert-test-api sh /srv/albert/edge-test/config/acme-renew.sh now"),
    ("venv", "sh /srv/albert/edge-test/config/acme-renew.sh now"),
])
def test_renew_cert_renews_on_the_api_host_then_names_the_certificate(config_factory, runtime, renew):
    from pyalbert.engine.edge_certificate import renew_env

    config_factory.env(('runtime = "venv"\n' if runtime == "venv" else "") + ENV + ACME)
    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    runner = Renewing(0, "acme: installed a new certificate", ISSUED_OUT)
    assert renew_env(load_spec("test", config_factory.root), lambda host: runner) == {
        "h": "front door certificate: issued by R11 for api.example.org, valid until Mar  2 06:10:26 2027 GMT"}
    assert runner.asked[0] == renew


def test_renew_cert_failure_and_refusal_name_the_fix(config_factory):
    from pyalbert.engine.edge_certificate import renew_env

    config_factory.env(ENV + ACME)
    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    spec_ = load_spec("test", config_factory.root)
    with pytest.raises(AlbertError, match=r"renew-cert failed on 1 of 1 host\(s\): host h: the renewal "
                                          r"failed \(acme: no certificate\); the front door keeps"):
        renew_env(spec_, lambda host: Renewing(1, "acme: no certificate", ISSUED_OUT))
    config_factory.env(ENV + '[edge]\ntls = "file"\n')
    with pytest.raises(AlbertError, match='no automatic certificate to renew .*tls = "file".*Fix: set tls = "acme"'):
        renew_env(load_spec("test", config_factory.root), lambda host: None)
