"""The venv runtime's builders: whole command strings, and the probe/act split works for real."""

from __future__ import annotations

import sys

from pyalbert.commands import process
from pyalbert.remote import LocalRunner


def test_start_golden():
    cmd = process.start("/srv/tools/bin/albert", "/srv/run-local", "albert-local-vllm-m",
                        ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--port", "8001"],
                        env_file="/srv/rel/m.env", labels={"albert.release": "r1", "albert.config-hash": "abc"})
    assert cmd.render() == (
        "/srv/tools/bin/albert supervise start albert-local-vllm-m --state-dir /srv/run-local "
        "--env-file /srv/rel/m.env --label albert.config-hash=abc --label albert.release=r1 "
        "--stop-timeout 10 -- /venv/bin/python -m vllm.entrypoints.openai.api_server --port 8001"
    )


def test_stop_status_logs_golden():
    assert process.stop("albert", "/r", "n").render() == "albert supervise stop n --state-dir /r --stop-timeout 10"
    assert process.status("albert", "/r").render() == "albert supervise status --state-dir /r"
    assert process.logs("/r", "n", 5, follow=True).render() == "tail -n 5 -F /r/n.log"


def test_python_version_probe_for_real():
    out = LocalRunner().run(process.python_version(sys.executable)).stdout
    assert process.parse_python_version(out) == sys.version_info[:2]
    assert process.parse_python_version("") is None


def test_systemd_unit_renders_restart_policy_and_env_file():
    text = process.systemd_unit("albert-prod-vllm-m", ["/v/bin/python", "-m", "x", "--a b"],
                                env_file="/etc/albert/m.env", user="gitlab", description="vLLM m")
    assert "ExecStart=/v/bin/python -m x '--a b'\n" in text
    assert "Restart=on-failure" in text and "EnvironmentFile=/etc/albert/m.env" in text
    assert "User=gitlab" in text and "WorkingDirectory" not in text


def test_reload_builders_for_both_runtimes():
    from pyalbert.commands import docker

    assert process.signal("albert", "/r", "api-blue").render() == (
        "albert supervise signal api-blue HUP --state-dir /r")
    assert docker.kill_signal("albert-prod-api-blue").render() == (
        "docker kill --signal HUP albert-prod-api-blue")
