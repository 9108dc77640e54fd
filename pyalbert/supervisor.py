"""A small process supervisor for hosts without systemd (test hosts, containers, some VMs).

``albert supervise start NAME --state-dir DIR [--env-file F] -- CMD...`` detaches, writes
``DIR/NAME.json`` (supervisor pid, child pid, restarts, state), runs CMD with its output appended
to ``DIR/NAME.log`` (rotated at ``--log-max-bytes``, ``--log-backups`` kept), and restarts it when
it exits with an error (backoff; gives up after ``--max-restarts`` within a minute and records
``failed``). ``stop`` sends SIGTERM to the supervisor, which stops the child (SIGTERM, then
SIGKILL after ``--stop-timeout``) and exits. ``status`` prints the state files as JSON.

One supervisor per name: it holds ``DIR/NAME.lock`` (``flock``) for its whole life, so a ``start``
waits for a supervisor that is still stopping instead of answering "already running" or racing
its last state write, and a ``stop`` returns only once the lock is free (the supervisor is gone).
Processes are known by identity, not by pid alone: pid + start time (``/proc/PID/stat`` field 22)
+ boot id are recorded, and nothing is signalled whose identity does not match (a stale state
file or a reused pid names another process). Restart times are recorded (``restart_times``, epoch
seconds, the last 100): a crash loop shows as restarts in the last minutes.

The venv runtime's builders (:mod:`pyalbert.commands.process`) call this on the host; systemd
hosts get units instead. Stdlib only: it runs from the tools venv on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def _state_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def _write_state(state_dir: Path, **state) -> None:
    path = _state_path(state_dir, state["name"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, path)


def parse_proc_stat(text: str) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from ``/proc/PID/stat``.

    The command (field 2) is in parentheses and may hold spaces and ``)``: fields are counted
    after its last ``)``; the state is field 3, the start time field 22.
    """
    try:
        fields = text.rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def identity(pid: int | None) -> int | None:
    """The start time of a live (not zombie) ``pid``; None when there is no such process."""
    if not pid:
        return None
    try:
        stat = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None
    if stat is None or stat[0] in ("Z", "X"):
        return None
    return stat[1]


def _is(pid: int | None, start: int | None, boot: str | None) -> bool:
    """Is ``pid`` still the process that was recorded (same boot, same start time)?

    A state file written before identities were recorded (no start time) falls back to "a
    process with this pid lives"."""
    if not pid:
        return False
    if boot and boot != boot_id():
        return False
    now = identity(pid)
    if now is None:
        return False
    return start is None or now == start


def _alive(pid: int | None) -> bool:
    return identity(pid) is not None


class NameLock:
    """``DIR/NAME.lock``: held by the one supervisor of NAME for its whole life (flock: the kernel
    releases it when the holder dies, whatever killed it)."""

    def __init__(self, state_dir: Path, name: str):
        self.fd = os.open(state_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def read_env_file(path: str | None) -> dict[str, str]:
    env: dict[str, str] = {}
    if not path:
        return env
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        env[key.strip()] = value
    return env


class RotatingLog:
    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.lock = threading.Lock()
        self.handle = open(path, "ab")  # noqa: SIM115 - lives as long as the supervisor

    def write(self, data: bytes) -> None:
        with self.lock:
            self._write(data)

    def _write(self, data: bytes) -> None:
        while data:
            room = max(self.max_bytes - self.handle.tell(), 0)
            self.handle.write(data[:room])
            self.handle.flush()
            data = data[room:]
            if self.handle.tell() >= self.max_bytes:
                self.rotate()

    def rotate(self) -> None:
        self.handle.close()
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self.handle = open(self.path, "ab")  # noqa: SIM115


def supervise(args: argparse.Namespace) -> int:
    """Runs in the detached supervisor process."""
    state_dir, name = Path(args.state_dir), args.name
    log = RotatingLog(state_dir / f"{name}.log", args.log_max_bytes, args.log_backups)
    env = {**os.environ, **read_env_file(args.env_file)}
    stopping = False
    child: subprocess.Popen | None = None

    def on_term(signum, frame):
        nonlocal stopping
        stopping = True
        if child and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    restarts, recent, restart_times = 0, [], []
    started = time.time()
    labels = dict(item.split("=", 1) for item in args.label if "=" in item)
    me = {"supervisor_start": identity(os.getpid()), "boot_id": boot_id(),
          "token": getattr(args, "token", "")}

    def record(**state) -> None:
        _write_state(state_dir, name=name, labels=labels, cmd=args.cmd, started=started,
                     restarts=restarts, restart_times=restart_times, **me, **state)

    code = 0
    while not stopping:
        log.write(f"--- albert-supervise: starting {name} (restart {restarts})\n".encode())
        # its own process group: what it spawns (vLLM's engine processes) goes with it
        child = subprocess.Popen(args.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=args.cwd or None,
                                 start_new_session=True)
        if stopping:  # SIGTERM came while it was being spawned
            child.terminate()
        record(supervisor_pid=os.getpid(), pid=child.pid, pid_start=identity(child.pid),
               state="running")
        pump = threading.Thread(target=_pump, args=(child, log), daemon=True)
        pump.start()
        code = _wait(child, lambda: stopping, args.stop_timeout)
        _kill_group(child.pid)  # leftovers would hold the port (and the log pipe)
        pump.join(5)
        log.write(f"--- albert-supervise: {name} exited with {code}\n".encode())
        if stopping:
            break
        now = time.monotonic()
        recent = [t for t in recent if now - t < 60] + [now]
        if code == 0 and not args.restart_always or len(recent) > args.max_restarts:
            state = "exited" if code == 0 else "failed"
            record(supervisor_pid=None, pid=None, state=state, exit_code=code)
            return 0 if code == 0 else 1
        restarts += 1
        restart_times = [*restart_times, round(time.time(), 3)][-100:]
        record(supervisor_pid=os.getpid(), pid=None, state="restarting", exit_code=code)
        backoff_until = time.monotonic() + min(2 ** len(recent) * 0.25, 10)
        while not stopping and time.monotonic() < backoff_until:
            time.sleep(0.05)
    record(supervisor_pid=None, pid=None, state="stopped", exit_code=code)
    return 0


def _pump(child: subprocess.Popen, log: RotatingLog) -> None:
    """Copy the child's output to the log until it closes (a thread: the supervisor waits on
    the child itself, so a grandchild holding the pipe cannot hide the child's exit)."""
    assert child.stdout is not None
    with contextlib.suppress(OSError, ValueError):
        while chunk := child.stdout.read1(65536):  # type: ignore[attr-defined]
            log.write(chunk)


def _wait(child: subprocess.Popen, stopping, stop_timeout: float) -> int:
    """The child's exit code; once ``stopping()``, SIGKILL its group after ``stop_timeout``."""
    deadline = None
    while True:
        try:
            return child.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
        if stopping():
            deadline = deadline or time.monotonic() + stop_timeout
            if time.monotonic() >= deadline:
                _kill_group(child.pid)


def _kill_group(pgid: int | None) -> None:
    if pgid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def start(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = NameLock(state_dir, args.name)
    if getattr(args, "replace", False) and _state_path(state_dir, args.name).exists():
        # one call for a restart in place (a model's only replica out of service meanwhile):
        # stop what runs under NAME, keep its lock, start the new command under it
        if _stop(state_dir, args, lock, quiet=True):
            lock.close()
            return 1
    elif not lock.try_acquire():
        current = status_of(state_dir, args.name)
        if current.get("running") and current.get("cmd") == args.cmd:
            print(f"{args.name}: already running (pid {current['pid']})")
            return 0
        # a supervisor still holds the name: it is stopping (or runs another command): wait
        if not lock.acquire(args.stop_timeout + 5):
            print(f"{args.name}: another supervisor still runs it (pid "
                  f"{current.get('supervisor_pid')}, {current.get('state')}) with another command; "
                  f"stop it first: albert supervise stop {args.name}", file=sys.stderr)
            return 1
    current = status_of(state_dir, args.name)
    if current.get("running"):  # a supervisor from before the name lock: the same check as then
        print(f"{args.name}: already running (pid {current['pid']})")
        return 0
    args.token = os.urandom(8).hex()
    if os.fork():  # parent: wait until the child wrote its state (the lock is the child's now)
        lock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = status_of(state_dir, args.name)
            if now.get("token") == args.token:
                if now.get("running"):
                    print(f"{args.name}: started")
                    return 0
                break
            time.sleep(0.02)
        print(f"{args.name}: did not start, see {state_dir / (args.name + '.log')}", file=sys.stderr)
        return 1
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        code = supervise(args)
    except BaseException:  # a bug: leave the traceback where the user looks
        import traceback

        with open(state_dir / f"{args.name}.log", "a") as log:
            traceback.print_exc(file=log)
        code = 70
    os._exit(code)


def status_of(state_dir: Path, name: str) -> dict:
    path = _state_path(state_dir, name)
    if not path.exists():
        return {"name": name, "state": "absent", "running": False}
    state = json.loads(path.read_text())
    live = _is(state.get("supervisor_pid"), state.get("supervisor_start"), state.get("boot_id"))
    state["running"] = live and state.get("state") in {"running", "restarting"}
    if not live and state.get("state") in {"running", "restarting"}:
        state["state"] = "dead"
    return state


def _child_is_recorded(state: dict) -> bool:
    """Is the recorded child still that process? (Only then may its group be killed.)"""
    return "pid_start" in state and _is(state.get("pid"), state["pid_start"], state.get("boot_id"))


def stop(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not _state_path(state_dir, args.name).exists():
        print(f"{args.name}: not running")
        return 0
    lock = NameLock(state_dir, args.name)
    try:
        return _stop(state_dir, args, lock)
    finally:
        lock.close()


def _stop(state_dir: Path, args: argparse.Namespace, lock: NameLock, *, quiet: bool = False) -> int:
    """Stop NAME; on success (0) this process holds its name lock."""
    state = status_of(state_dir, args.name)
    was_running = state["running"]
    if was_running:
        sup, sup_start, boot = state["supervisor_pid"], state.get("supervisor_start"), state.get("boot_id")
        with contextlib.suppress(ProcessLookupError):  # it may have just given up
            os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + args.stop_timeout + 5
        while time.monotonic() < deadline and _is(sup, sup_start, boot):
            time.sleep(0.02)
        if _is(sup, sup_start, boot):  # a stuck supervisor: kill the child's group, then it
            if _child_is_recorded(state):
                _kill_group(state.get("pid"))
            with contextlib.suppress(ProcessLookupError):
                os.kill(sup, signal.SIGKILL)
    # the supervisor is gone once its lock is free; holding it, no start can begin meanwhile
    if not lock.acquire(args.stop_timeout + 5):
        print(f"{args.name}: its supervisor did not exit", file=sys.stderr)
        return 1
    state = status_of(state_dir, args.name)
    if state["state"] in ("absent", "stopped"):
        said = f"{args.name}: stopped" if was_running else f"{args.name}: not running"
    else:
        if state["state"] == "dead" and _child_is_recorded(state):
            _kill_group(state.get("pid"))  # its supervisor was killed: the child may still serve
        was = state["state"]
        _mark_stopped(state_dir, state)  # like `docker rm`: no longer listed
        said = f"{args.name}: stopped" if was_running else f"{args.name}: not running (was {was}); removed"
    if not quiet:
        print(said)
    return 0


def _mark_stopped(state_dir: Path, state: dict) -> None:
    keep = {k: v for k, v in state.items() if k not in ("running", "state", "supervisor_pid", "pid")}
    _write_state(state_dir, **keep, state="stopped", supervisor_pid=None, pid=None)


def send_signal(args: argparse.Namespace) -> int:
    """Forward a signal to NAME's process (``HUP``: the api reloads its keys and whitelist)."""
    state = status_of(Path(args.state_dir), args.name)
    if not state["running"] or not _is(state.get("pid"), state.get("pid_start"), state.get("boot_id")):
        print(f"{args.name}: not running, nothing to signal")
        return 0
    signum = getattr(signal, f"SIG{args.signal.upper().removeprefix('SIG')}")
    os.kill(state["pid"], signum)
    print(f"{args.name}: sent {signum.name} to {state['pid']}")
    return 0


def status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    names = args.names or sorted(p.stem for p in state_dir.glob("*.json")) if state_dir.exists() else []
    print(json.dumps([status_of(state_dir, n) for n in names], sort_keys=True))
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="albert supervise", description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True)
    p_start = actions.add_parser("start", help="start NAME detached and keep it running")
    p_start.add_argument("name")
    p_start.add_argument("--state-dir", required=True)
    p_start.add_argument("--env-file")
    p_start.add_argument("--cwd")
    p_start.add_argument("--log-max-bytes", type=int, default=50 * 1024 * 1024)
    p_start.add_argument("--log-backups", type=int, default=3)
    p_start.add_argument("--max-restarts", type=int, default=5, help="per minute, then give up")
    p_start.add_argument("--restart-always", action="store_true", help="restart on exit code 0 too")
    p_start.add_argument("--stop-timeout", type=float, default=10)
    p_start.add_argument("--replace", action="store_true",
                         help="stop what runs under NAME first (a restart in one call)")
    p_start.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                         help="recorded in the state (release, config hash)")
    p_start.add_argument("cmd", nargs="+")
    p_start.set_defaults(func=start)
    p_stop = actions.add_parser("stop", help="stop NAME and its process")
    p_stop.add_argument("name")
    p_stop.add_argument("--state-dir", required=True)
    p_stop.add_argument("--stop-timeout", type=float, default=10)
    p_stop.set_defaults(func=stop)
    p_signal = actions.add_parser("signal", help="send a signal to NAME's process (e.g. HUP)")
    p_signal.add_argument("name")
    p_signal.add_argument("signal", choices=["HUP", "USR1", "USR2", "TERM"])
    p_signal.add_argument("--state-dir", required=True)
    p_signal.set_defaults(func=send_signal)
    p_status = actions.add_parser("status", help="state of the supervised processes, as JSON")
    p_status.add_argument("names", nargs="*")
    p_status.add_argument("--state-dir", required=True)
    p_status.set_defaults(func=status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
