"""The venv runtime's supervisor, with real processes on this machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable


def albert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pyalbert.supervisor", *args], capture_output=True, text=True,
                          timeout=30)


def state(state_dir: Path, name: str) -> dict:
    out = albert("status", name, "--state-dir", str(state_dir))
    return json.loads(out.stdout)[0]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def state_dir(tmp_path):
    yield tmp_path
    for path in tmp_path.glob("*.json"):
        albert("stop", path.stem, "--state-dir", str(tmp_path), "--stop-timeout", "2")


SERVER = "import time,sys; print('hello', flush=True); time.sleep(60)"


def test_start_status_stop(state_dir):
    out = albert("start", "svc", "--state-dir", str(state_dir), "--", PY, "-c", SERVER)
    assert out.returncode == 0 and "started" in out.stdout
    st = state(state_dir, "svc")
    assert st["running"] and st["state"] == "running"
    wait_for(lambda: "hello" in (state_dir / "svc.log").read_text())
    again = albert("start", "svc", "--state-dir", str(state_dir), "--", PY, "-c", SERVER)
    assert "already running" in again.stdout
    child = st["pid"]
    assert albert("stop", "svc", "--state-dir", str(state_dir)).returncode == 0
    final = state(state_dir, "svc")
    assert final["state"] == "stopped" and not final["running"]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_crashed_process_is_restarted(state_dir):
    albert("start", "svc", "--state-dir", str(state_dir), "--", PY, "-c", SERVER)
    first = state(state_dir, "svc")["pid"]
    os.kill(first, signal.SIGKILL)
    restarted = wait_for(lambda: (s := state(state_dir, "svc"))["pid"] not in (None, first) and s)
    assert restarted["restarts"] == 1 and restarted["running"]


def test_crash_loop_gives_up_as_failed(state_dir):
    albert("start", "bad", "--state-dir", str(state_dir), "--max-restarts", "2", "--",
           PY, "-c", "import sys; sys.exit(3)")
    final = wait_for(lambda: (s := state(state_dir, "bad"))["state"] == "failed" and s, timeout=20)
    assert final["exit_code"] == 3 and final["restarts"] == 2 and not final["running"]


def test_env_file_and_log_rotation(state_dir):
    env = state_dir / "env"
    env.write_text("# comment\nGREETING=bonjour tout le monde\n")
    script = "import os; [print(os.environ['GREETING'], i, flush=True) for i in range(2000)]"
    albert("start", "chatty", "--state-dir", str(state_dir), "--env-file", str(env),
           "--log-max-bytes", "4096", "--log-backups", "2", "--", PY, "-c", script)
    wait_for(lambda: state(state_dir, "chatty")["state"] == "exited")
    logs = sorted(p.name for p in state_dir.glob("chatty.log*"))
    assert logs == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    assert all(p.stat().st_size < 4096 + 200 for p in state_dir.glob("chatty.log*"))
    assert "bonjour tout le monde 1999" in (state_dir / "chatty.log.1").read_text() + (
        state_dir / "chatty.log").read_text()


def test_status_of_unknown_name(state_dir):
    assert state(state_dir, "nothing") == {"name": "nothing", "state": "absent", "running": False}


STUBBORN = ("import signal,subprocess,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('up', flush=True); time.sleep(60)")


def test_stop_kills_a_child_that_ignores_sigterm_and_its_group_after_the_timeout(state_dir):
    albert("start", "stubborn", "--state-dir", str(state_dir), "--stop-timeout", "1", "--",
           PY, "-c", STUBBORN)
    wait_for(lambda: "up" in (state_dir / "stubborn.log").read_text())
    st = state(state_dir, "stubborn")
    group = [int(p) for p in subprocess.run(["pgrep", "-g", str(st["pid"])], capture_output=True,
                                            text=True).stdout.split()]
    assert len(group) == 2  # the server and what it spawned, in their own process group
    t0 = time.monotonic()
    assert albert("stop", "stubborn", "--state-dir", str(state_dir), "--stop-timeout", "1"
                  ).returncode == 0
    assert time.monotonic() - t0 < 3  # the supervisor's own timeout, not the CLI's fallback
    final = state(state_dir, "stubborn")
    assert final["state"] == "stopped" and final["exit_code"] == -9
    for pid in group:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists()
                 or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_stop_of_a_failed_or_orphaned_process_removes_it(state_dir):
    albert("start", "svc", "--state-dir", str(state_dir), "--", PY, "-c", SERVER)
    st = state(state_dir, "svc")
    os.kill(st["supervisor_pid"], signal.SIGKILL)  # the supervisor dies, its child serves on
    dead = wait_for(lambda: (s := state(state_dir, "svc"))["state"] == "dead" and s)
    assert not dead["running"]
    out = albert("stop", "svc", "--state-dir", str(state_dir))
    assert "was dead" in out.stdout and state(state_dir, "svc")["state"] == "stopped"
    wait_for(lambda: not Path(f"/proc/{st['pid']}").exists()
             or Path(f"/proc/{st['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")


HUP_AWARE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGHUP, lambda *a: print('reloaded', flush=True))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_signal_is_forwarded_to_the_process(state_dir):
    albert("start", "api", "--state-dir", str(state_dir), "--", PY, "-c", HUP_AWARE)
    log = state_dir / "api.log"
    wait_for(lambda: "ready" in log.read_text())
    pid = state(state_dir, "api")["pid"]
    out = albert("signal", "api", "HUP", "--state-dir", str(state_dir))
    assert out.returncode == 0 and f"sent SIGHUP to {pid}" in out.stdout
    wait_for(lambda: "reloaded" in log.read_text())
    assert state(state_dir, "api")["pid"] == pid  # reloaded in place, not restarted
    assert "not running" in albert("signal", "nothing", "HUP", "--state-dir", str(state_dir)).stdout
