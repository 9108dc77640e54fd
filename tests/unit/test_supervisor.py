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
    assert albert("stop", "stubborn", "--state-dir", str(state_dir), "--stop-timeout", "1"
                  ).returncode == 0
    # the supervisor itself killed it after its timeout and recorded so (no clock: a loaded
    # machine made a 3 s bound on the whole CLI call flaky)
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


# -- identity: pid + start time (+ boot id), one supervisor per name (issue 15) ---------------

# captured from this machine: a command with spaces and a ')' in it (field 2), then field 3...
PROC_STAT = ("18787 (we ird) name) S 18782 18782 13940 0 -1 4194304 97 0 0 0 0 0 0 0 20 0 1 0 "
             "494788 3133440 379 18446744073709551615 94852176547840 94852176567721 0 0 0 0 0")


def test_proc_stat_parser_reads_state_and_start_time_after_the_last_parenthesis():
    from pyalbert.supervisor import parse_proc_stat

    assert parse_proc_stat(PROC_STAT) == ("S", 494788)
    assert parse_proc_stat("garbage") is None


def _bystander(tmp_path: Path) -> subprocess.Popen:
    """An unrelated process in its own group: what a reused pid points at."""
    return subprocess.Popen([PY, "-c", "import time; time.sleep(60)"], start_new_session=True)


def _plant(state_dir: Path, name: str, **fields) -> None:
    doc = {"name": name, "cmd": ["old"], "labels": {}, "restarts": 0, "started": 0, **fields}
    (state_dir / f"{name}.json").write_text(json.dumps(doc))


def test_stale_state_naming_a_reused_pid_is_neither_signalled_nor_running(state_dir, tmp_path):
    from pyalbert.supervisor import boot_id, identity

    other = _bystander(tmp_path)
    try:
        wait_for(lambda: identity(other.pid))
        # the pid lives, but it is not the process that was recorded (another start time)
        _plant(state_dir, "svc", state="running", supervisor_pid=other.pid, pid=other.pid,
               supervisor_start=identity(other.pid) - 1, pid_start=identity(other.pid) - 1,
               boot_id=boot_id())
        assert state(state_dir, "svc")["state"] == "dead"
        out = albert("stop", "svc", "--state-dir", str(state_dir))
        assert out.returncode == 0 and other.poll() is None  # not SIGTERMed nor group-SIGKILLed
        _plant(state_dir, "svc", state="running", supervisor_pid=other.pid, pid=other.pid,
               supervisor_start=identity(other.pid) + 1, boot_id=boot_id())
        started = albert("start", "svc", "--state-dir", str(state_dir), "--", PY, "-c", SERVER)
        assert "started" in started.stdout, started.stdout + started.stderr
        assert state(state_dir, "svc")["supervisor_pid"] != other.pid
    finally:
        other.kill()
        other.wait()


def test_a_state_file_from_another_boot_is_dead(state_dir, tmp_path):
    from pyalbert.supervisor import identity

    other = _bystander(tmp_path)
    try:
        wait_for(lambda: identity(other.pid))
        _plant(state_dir, "svc", state="running", supervisor_pid=other.pid, pid=other.pid,
               supervisor_start=identity(other.pid), pid_start=identity(other.pid),
               boot_id="another-boot")
        assert state(state_dir, "svc")["state"] == "dead"
        albert("stop", "svc", "--state-dir", str(state_dir))
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_start_waits_for_a_supervisor_still_stopping_and_runs_the_new_command(state_dir):
    """The rollback race: the failing unit's supervisor is still on its way out (its child
    ignores SIGTERM) when the previous release starts under the same name."""
    albert("start", "svc", "--state-dir", str(state_dir), "--stop-timeout", "1", "--",
           PY, "-c", STUBBORN)
    wait_for(lambda: "up" in (state_dir / "svc.log").read_text())
    old = state(state_dir, "svc")
    os.kill(old["supervisor_pid"], signal.SIGTERM)  # stopping: takes ~1 s (SIGKILL after)
    new = albert("start", "svc", "--state-dir", str(state_dir), "--", PY, "-c", SERVER)
    assert new.returncode == 0 and "started" in new.stdout, new.stdout + new.stderr
    now = state(state_dir, "svc")
    assert now["running"] and now["cmd"][-1] == SERVER and now["supervisor_pid"] != old["supervisor_pid"]
    time.sleep(0.5)  # the old supervisor wrote nothing after the new one took over
    assert state(state_dir, "svc")["supervisor_pid"] == now["supervisor_pid"]


def test_start_of_another_command_while_one_runs_is_refused(state_dir):
    albert("start", "svc", "--state-dir", str(state_dir), "--stop-timeout", "0.5", "--",
           PY, "-c", SERVER)
    out = albert("start", "svc", "--state-dir", str(state_dir), "--stop-timeout", "0.5", "--",
                 PY, "-c", "print(1)")
    assert out.returncode == 1 and "stop it first" in out.stderr
    assert state(state_dir, "svc")["cmd"][-1] == SERVER


def test_restart_times_are_recorded(state_dir):
    albert("start", "bad", "--state-dir", str(state_dir), "--max-restarts", "2", "--",
           PY, "-c", "import sys; sys.exit(3)")
    final = wait_for(lambda: (s := state(state_dir, "bad"))["state"] == "failed" and s, timeout=20)
    assert len(final["restart_times"]) == final["restarts"] == 2
    assert all(abs(t - time.time()) < 60 for t in final["restart_times"])


def test_start_with_replace_stops_what_runs_under_the_name_and_starts_the_new_command(state_dir):
    """A restart in place in one call: the old process (and its group) is gone, the new command
    runs under the name, a fresh supervisor; a name that never ran simply starts."""
    albert("start", "svc", "--state-dir", str(state_dir), "--", PY, "-c", SERVER)
    old = state(state_dir, "svc")
    out = albert("start", "svc", "--state-dir", str(state_dir), "--replace", "--",
                 PY, "-c", SERVER + " # v2")
    assert out.returncode == 0 and "started" in out.stdout, out.stdout + out.stderr
    now = state(state_dir, "svc")
    assert now["running"] and now["cmd"][-1].endswith("# v2")
    assert now["supervisor_pid"] != old["supervisor_pid"]
    from pyalbert.supervisor import identity

    assert identity(old["pid"]) is None and identity(old["supervisor_pid"]) is None  # gone (or a zombie)
    fresh = albert("start", "other", "--state-dir", str(state_dir), "--replace", "--", PY, "-c", SERVER)
    assert fresh.returncode == 0 and state(state_dir, "other")["running"]


def test_replace_of_a_crash_looping_name_starts_the_new_command(state_dir):
    albert("start", "svc", "--state-dir", str(state_dir), "--", PY, "-c", "import sys; sys.exit(3)")
    wait_for(lambda: state(state_dir, "svc")["restarts"] >= 1)
    out = albert("start", "svc", "--state-dir", str(state_dir), "--replace", "--", PY, "-c", SERVER)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "hello" in (state_dir / "svc.log").read_text())
    assert state(state_dir, "svc")["state"] == "running"
