"""A vLLM replace without downtime: the decisions, the builders, the order of steps and undo."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import pytest

from pyalbert.api.backends_reload import POLL_S
from pyalbert.commands import routes
from pyalbert.commands.base import Cmd
from pyalbert.commands.health import ReadyCheck
from pyalbert.config import load_spec, resolve_placement
from pyalbert.engine.vllm_replace import GAP_POLL_S, ModelRoll, VllmReplace, choose
from pyalbert.errors import AlbertError, ConfigError
from pyalbert.remote import Result
from pyalbert.runtimes.base import FileSpec, Unit
from pyalbert.runtimes.slots import ReplaceSettings, VllmSlots, cpu_no_room, gpu_no_room

GIB = 1 << 30


# -- builders -------------------------------------------------------------------------------------

def test_point_writes_the_route_atomically_on_stdin():
    cmd = routes.point("/srv/albert/routes-prod", "albert-prod-vllm-m", "m", "http://10.0.0.5:8000",
                       "http://10.0.0.5:28000", 7)
    assert cmd.render() == (
        "sh -c 'umask 077 && mkdir -p /srv/albert/routes-prod && cat > "
        "/srv/albert/routes-prod/albert-prod-vllm-m.json.tmp && chmod 0644 "
        "/srv/albert/routes-prod/albert-prod-vllm-m.json.tmp && mv -f "
        "/srv/albert/routes-prod/albert-prod-vllm-m.json.tmp /srv/albert/routes-prod/albert-prod-vllm-m.json'")
    assert cmd.stdin_text == ('{"base": "http://10.0.0.5:8000", "model": "m", "retry_after": 7, '
                              '"url": "http://10.0.0.5:28000"}\n')


METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
"""


@pytest.mark.parametrize("text, n", [(METRICS, 4), (METRICS.replace("3.0", "0").replace(" 1\n", " 0\n"), 0),
                                     ("", None), ('{"error": "loading"}', None)],
                         ids=["busy", "idle", "no-answer", "not-metrics"])
def test_parse_in_flight(text, n):
    assert routes.parse_in_flight(text) == n


def test_memory_probe_and_its_verdict():
    assert routes.memory("/models/m").render() == (
        "sh -c 'grep -m1 MemAvailable /proc/meminfo; du -sbL \"$1\" 2>/dev/null || echo \"0 $1\"' "
        "memory /models/m")
    out = f"MemAvailable:   {20 * GIB // 1024} kB\n{2 * GIB}\t/models/m\n"
    assert routes.parse_memory(out) == (20 * GIB, 2 * GIB)
    assert cpu_no_room(out, kv=4) is None  # 2 + 4 + 1 GiB <= 20
    assert cpu_no_room(out, kv=100) == ("a second server needs about 103.0 GiB (weights 2.0 + KV "
                                        "cache 100 + 1 GiB) and 20.0 GiB of RAM is free")
    assert cpu_no_room("garbage", kv=4) == "the free memory could not be read"


# -- config: the spare port and the GPU budget -------------------------------------------------

def test_spare_port_is_derived_and_its_clash_names_the_key(simple_config):
    placement = resolve_placement(load_spec("test", simple_config.root))
    small = placement.vllm[0]
    assert (small.port, small.model.replace_port, small.spare_slot().port) == (8001, 28001, 28001)
    assert small.spare_slot().name == "albert-test-vllm-small-spare"
    assert small.spare_slot().base_url == small.url == "http://127.0.0.1:8001"
    simple_config.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4},
                           "other": {"model": "org/other", "port": 28001, "gpu_mem_use": 0.4}})
    with pytest.raises(ConfigError) as info:
        load_spec("test", simple_config.root)
    assert "other.port" in str(info.value) and "(its spare port)" in str(info.value)


def test_gpu_room_is_the_gpu_mem_use_budget(simple_config):
    placement = resolve_placement(load_spec("test", simple_config.root))  # 0.4 + 0.4 on GPU 0
    assert gpu_no_room(placement, placement.vllm[0]) == (
        "a second server would exceed the GPUs' memory budget (GPU 0: 0.80 used + 0.40 > 1.00 of "
        "gpu_mem_use)")
    simple_config.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.3},
                           "other": {"model": "org/other", "port": 8002, "gpu_mem_use": 0.3}})
    placement = resolve_placement(load_spec("test", simple_config.root))
    assert gpu_no_room(placement, placement.vllm[0]) is None  # 0.6 + 0.3 fits


def test_max_unavailable_and_drain_timeout_are_validated(simple_config):
    simple_config.env("[deploy]\nmax_unavailable = 0\n[[hosts]]\nname='a'\naddress='h'\n")
    with pytest.raises(ConfigError, match="max_unavailable"):
        load_spec("test", simple_config.root)


@pytest.mark.parametrize("live, no_room, kind", [(None, None, "start"), (None, "x", "start"),
                                                 ("u", None, "beside"), ("u", "no RAM", "restart")])
def test_choose(live, no_room, kind):
    assert choose(live, no_room) == kind


def test_model_roll_lets_max_unavailable_replicas_out_at_once():
    roll, cancel = ModelRoll(1), threading.Event()
    inside, peak, lock = [0], [0], threading.Lock()
    gate = threading.Barrier(3)

    def replica():
        gate.wait()
        with roll.out_of_rotation("m", cancel):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            threading.Event().wait(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == 1


# -- the sequence, against a scripted host ---------------------------------------------------

def unit(name: str, port: int, config: str) -> Unit:
    return Unit(name=name, service="vllm", config_hash=config, start=Cmd.of("start", name, config),
                stop=Cmd.of("stop", name), probe=Cmd.of("probe", name), logs=Cmd.of("logs", name),
                ready=ReadyCheck(port, "m"), model_id="m", port=port)


def planned(config: str, *, no_room: str | None = None) -> Unit:
    spare = unit("vllm-m-spare", 28000, config)
    slots = VllmSlots(other=spare, model="m", base_url="http://127.0.0.1:8000", route="vllm-m",
                      gpu_no_room=no_room)
    main = unit("vllm-m", 8000, config)
    return Unit(**{**main.__dict__, "slots": slots})


@dataclass
class Running:
    running: bool


@dataclass
class ScriptedHost:
    """Just enough of a HostDeploy: what runs, what was done in which order."""

    running: set = field(default_factory=set)
    log: list = field(default_factory=list)
    fail_ready: set = field(default_factory=set)
    undo: list = field(default_factory=list)
    previous: dict = field(default_factory=dict)
    in_flight: list = field(default_factory=lambda: [2, 1, 0])

    def __post_init__(self):
        self.r, self.gateways, self.cancel, self.roll = self, self, threading.Event(), ModelRoll(1)
        self.name = "h"
        self.hp = type("HP", (), {"replace": ReplaceSettings((), "/r", 1, 5)})()

    # the runner
    def run(self, cmd: Cmd, check: bool = True) -> Result:
        verb, *args = str(cmd).split()
        if verb == "stop":
            self.running.discard(args[0])
        if verb in ("start", "stop"):
            self.log.append(f"{verb} {args[0]}")
        if cmd.stdin_text is not None and ".json" not in str(cmd):  # a unit's file (not a route)
            self.log.append("write " + re.search(r"mv -f \S+ ([^' ]+)", str(cmd))[1])
        if verb == "probe-cache":
            self.log.append("probe compile cache")
            return Result(cmd, 0, "/cache/m/inductor/x\n", "")
        if "metrics" in str(cmd):
            n = self.in_flight.pop(0) if self.in_flight else 0
            self.log.append(f"in flight {n}")
            return Result(cmd, 0, f'vllm:num_requests_running{{model_name="m"}} {n}\n', "")
        return Result(cmd, 0, "", "")

    # the session
    def state(self, u: Unit) -> Running:
        return Running(u.name in self.running)

    def say(self, text: str, style: str = "") -> None:
        self.log.append(f"say: {text}")

    def _start(self, u: Unit, poll_s: float | None = None, warm="probe", cmd=None) -> None:
        verb = "replace" if cmd is not None and cmd == u.replace else "start"
        self.log.append(f"{verb} {u.name} ({u.config_hash})" + (f" polls {poll_s:g}s" if poll_s else "")
                        + ("" if warm == "probe" else f" warm={warm}"))
        if u.config_hash in self.fail_ready:
            raise AlbertError(f"{u.name} was not ready")
        self.running.add(u.name)

    def wait_ready(self, u: Unit, quiet: bool = False) -> None:
        self.running.add(u.name)

    def check_cancel(self) -> None:
        pass

    def recorded(self, name: str) -> Unit | None:
        return self.previous.get(name)

    # the gateways
    def point(self, slots, url, retry_after=5, check_first=False):
        self.log.append(f"route -> {url or 'out of rotation'}")


def steps(host: ScriptedHost) -> list[str]:
    return [e for e in host.log if not e.startswith("say")]


def test_with_room_the_new_server_starts_beside_then_the_old_one_drains_and_stops():
    host = ScriptedHost(running={"vllm-m"}, previous={"vllm-m": unit("vllm-m", 8000, "old")})
    served = VllmReplace(host).run(planned("new"))
    assert served.name == "vllm-m-spare"
    assert steps(host) == [
        "stop vllm-m-spare", "start vllm-m-spare (new)",    # clean slot, start, ready
        "route -> http://127.0.0.1:28000",                  # the gateways route to it
        "in flight 2", "in flight 1", "in flight 0",        # the old one finishes its requests
        "stop vllm-m"]
    assert host.running == {"vllm-m-spare"}


def test_a_second_replace_goes_back_to_the_first_slot():
    host = ScriptedHost(running={"vllm-m-spare"}, in_flight=[])
    assert VllmReplace(host).run(planned("newer")).name == "vllm-m"
    assert steps(host)[:3] == ["stop vllm-m", "start vllm-m (newer)", "route -> http://127.0.0.1:8000"]
    assert host.running == {"vllm-m"}


def test_a_new_server_that_never_gets_ready_leaves_the_old_one_serving_and_routed():
    host = ScriptedHost(running={"vllm-m"}, fail_ready={"bad"},
                        previous={"vllm-m": unit("vllm-m", 8000, "old")})
    with pytest.raises(AlbertError):
        VllmReplace(host).run(planned("bad"))
    for step in reversed(host.undo):
        step()
    assert host.running == {"vllm-m"}
    assert "route -> http://127.0.0.1:28000" not in host.log  # never routed to the failed one


def test_undo_after_the_switch_restarts_the_old_release_and_routes_back():
    host = ScriptedHost(running={"vllm-m"}, in_flight=[],
                        previous={"vllm-m": unit("vllm-m", 8000, "old")})
    VllmReplace(host).run(planned("new"))
    host.log.clear()
    for step in reversed(host.undo):  # a later unit failed: this one goes back too
        step()
    assert steps(host) == ["stop vllm-m-spare", "start vllm-m", "route -> http://127.0.0.1:8000"]
    assert host.running == {"vllm-m"}


def test_without_room_it_says_so_takes_the_replica_out_then_restarts_in_place():
    """Its files are written and its compile cache probed while it still serves: the gap holds
    only the drain, the stop and the start (readiness polled every GAP_POLL_S)."""
    host = ScriptedHost(running={"vllm-m"}, in_flight=[1, 0],
                        previous={"vllm-m": unit("vllm-m", 8000, "old")})
    u = planned("new", no_room="GPU 0: 0.90 used + 0.90")
    u = Unit(**{**u.__dict__, "files": (FileSpec("/srv/auth.header", "key\n", secret=True),),
                "warm_probe": Cmd.of("probe-cache", "/cache/m")})
    served = VllmReplace(host).run(u)
    assert served.name == "vllm-m"
    said = [e for e in host.log if e.startswith("say")]
    assert "no room on host h for a second m server (GPU 0: 0.90 used + 0.90)" in said[0]
    assert steps(host) == ["write /srv/auth.header", "probe compile cache", "route -> out of rotation",
                           "in flight 1", "in flight 0", "stop vllm-m",
                           f"start vllm-m (new) polls {GAP_POLL_S:g}s warm=True", "route -> http://127.0.0.1:8000"]


def test_a_unit_that_restarts_in_one_call_has_its_checks_run_before_the_gap():
    """The venv runtime: `import vllm` (prepare) runs while the server still serves; the gap holds
    the drain and one call that stops and starts (no separate stop)."""
    host = ScriptedHost(running={"vllm-m"}, in_flight=[0],
                        previous={"vllm-m": unit("vllm-m", 8000, "old")})
    u = planned("new", no_room="no RAM")
    u = Unit(**{**u.__dict__, "prepare": Cmd.of("check-vllm"), "replace": Cmd.of("restart", "vllm-m")})
    orig = host.run

    def run(cmd, check=True):
        if str(cmd).startswith("check-vllm"):
            host.log.append("check vllm")
        return orig(cmd, check)

    host.r = type("R", (), {"run": staticmethod(run)})()
    VllmReplace(host).run(u)
    assert steps(host) == ["check vllm", "route -> out of rotation", "in flight 0",
                           f"replace vllm-m (new) polls {GAP_POLL_S:g}s warm=None",
                           "route -> http://127.0.0.1:8000"]


def test_nothing_running_starts_the_first_slot():
    host = ScriptedHost()
    assert VllmReplace(host).run(planned("new")).name == "vllm-m"
    assert steps(host) == ["stop vllm-m", "start vllm-m (new)", "route -> http://127.0.0.1:8000"]


def test_a_replace_killed_after_its_switch_converges_on_the_next_run():
    """Both slots run (the deployer died before stopping the old one): the route is made to point
    at the one with the wanted config and the other is drained and stopped."""
    host = ScriptedHost(running={"vllm-m", "vllm-m-spare"}, in_flight=[1, 0])
    u = planned("new")
    VllmReplace(host).settle(u, u.slots.other)
    assert steps(host) == ["route -> http://127.0.0.1:28000", "in flight 1", "in flight 0",
                           "stop vllm-m"]
    assert host.running == {"vllm-m-spare"}


# -- the restart's gap: what the host runs while the replica is out of rotation -----------------

def test_albert_supervise_parses_alone_without_the_config_models(tmp_path):
    """`albert supervise stop|start|status` run on the host during a restart in place: they must
    not import every command's module (the config models alone took ~0.5 s per call)."""
    import subprocess
    import sys

    code = ("import sys; from pyalbert.cli import main; "
            f"rc = main(['supervise', 'status', '--state-dir', {str(tmp_path)!r}]); "
            "print(rc, sorted(m for m in sys.modules if m.startswith('pyalbert.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stderr
    full = subprocess.run([sys.executable, "-c", "from pyalbert.cli import main; main(['--help'])"],
                          capture_output=True, text=True, timeout=60)
    assert "supervise" in full.stdout and "config" in full.stdout  # every command, as before


def test_the_drain_waits_out_a_gateway_scan_before_reading_the_gauges():
    """Never stop a server a gateway may still send to: every gateway worker scans the routes
    folder every POLL_S, so the drain waits longer than that before it trusts the gauges."""
    host = ScriptedHost(in_flight=[1, 0])
    waits: list[float] = []

    class Clock:
        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            host.log.append(f"wait {seconds:g}")
            return False

        def is_set(self) -> bool:
            return False

    host.cancel = Clock()
    VllmReplace(host).drain(unit("vllm-m", 8000, "old"))
    assert waits[0] > POLL_S
    assert steps(host) == [f"wait {waits[0]:g}", "in flight 1", "wait 0.2", "in flight 0"]


def test_readiness_waits_on_the_host_during_the_gap_and_checks_crash_loops_at_the_usual_pace():
    """A restart in place: each readiness call waits on the host (HOST_WAIT_S, polling there
    every 20 ms), calls follow each other every GAP_POLL_S; the crash-loop check (two status
    calls) keeps the pace of every 4 polls of the context (2 s); a deploy's readiness polls
    over SSH every 0.5 s."""
    from types import SimpleNamespace

    from pyalbert.engine.context import RunContext
    from pyalbert.engine.session import HOST_WAIT_S, HostSession

    log: list[str] = []
    ready_after = [5]

    def poll_ready(u, healthy, last, here=0.0):
        log.append(f"poll here={here:g}")
        ready_after[0] -= 1
        return ready_after[0] <= 0, False, "503"

    session = HostSession.__new__(HostSession)
    session.ctx, session.hp = RunContext("me", poll_s=0.5), SimpleNamespace(ready_timeout_s=600)
    session.cancel = SimpleNamespace(wait=lambda s: log.append(f"wait {s:g}"), is_set=lambda: False)
    session._poll_ready, session.say = poll_ready, lambda *a: None
    session._refuse_crash_loop = lambda u: log.append("crash-loop check")
    u = unit("vllm-m", 8000, "new")
    session.wait_ready(u, poll_s=GAP_POLL_S)
    assert log.count(f"poll here={HOST_WAIT_S:g}") == 5 and log.count(f"wait {GAP_POLL_S:g}") == 4
    assert log.count("crash-loop check") == 2  # after polls 2 and 4 (~2 s each)
    log.clear()
    ready_after[0] = 9
    session.wait_ready(u)
    assert log.count("poll here=0") == 9 and log.count("wait 0.5") == 8
    assert log.count("crash-loop check") == 2  # polls 4 and 8


def test_a_ray_node_restarting_while_its_group_restarts_is_not_a_crash_loop_at_once(monkeypatch):
    """A worker node whose head restarts too exits (`ray start --address` gives up) and is
    restarted by its runtime: within RAY_JOIN_GRACE_S its restarts are not judged; after it, and
    at once for a vLLM server, they are."""
    from types import SimpleNamespace

    from pyalbert.engine import session as session_mod
    from pyalbert.engine.context import RunContext
    from pyalbert.engine.session import HostSession, NotReady

    def waiting(u, grace: float) -> list[str]:
        monkeypatch.setattr(session_mod, "RAY_JOIN_GRACE_S", grace)
        log: list[str] = []
        polls = [12]

        def poll_ready(u, healthy, last, here=0.0):
            polls[0] -= 1
            return polls[0] <= 0, False, "not all nodes"

        def crash_check(u):
            log.append("crash-loop check")
            raise NotReady("exited before it was ready")

        s = HostSession.__new__(HostSession)
        s.ctx, s.hp = RunContext("me", poll_s=0.5), SimpleNamespace(ready_timeout_s=600)
        s.cancel = SimpleNamespace(wait=lambda x: None, is_set=lambda: False)
        s._poll_ready, s.say, s._refuse_crash_loop = poll_ready, lambda *a: None, crash_check
        try:
            s.wait_ready(u)
            log.append("ready")
        except NotReady:
            log.append("refused")
        return log

    node = Unit(**{**unit("albert-e-ray-m", 6379, "new").__dict__, "service": "ray"})
    assert waiting(node, grace=600) == ["ready"]
    assert waiting(node, grace=0) == ["crash-loop check", "refused"]
    assert waiting(unit("vllm-m", 8000, "new"), grace=600) == ["crash-loop check", "refused"]


def test_the_host_side_wait_reports_health_then_the_models_listed(tmp_path):
    """The gap's readiness call, run here by a real shell against a real HTTP server: nothing
    listening -> the status it saw after its budget; healthy -> the model list in the same call."""
    import http.server
    import subprocess
    import threading

    from pyalbert.commands.health import ReadyCheck, parse_models_once_healthy

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"{}" if self.path == "/health" else b'{"data": [{"id": "m"}]}'
            self.send_response(200 if self.headers.get("X-Key") == "k" or self.path == "/health"
                               else 401)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    header = tmp_path / "h"
    header.write_text("X-Key: k\n")
    try:
        check = ReadyCheck(srv.server_address[1], "m", header_file=str(header))
        out = subprocess.run(["bash", "-c", check.models_once_healthy(1).render()],
                             capture_output=True, text=True, timeout=30).stdout
        assert parse_models_once_healthy(out) == (200, ["m"])
        import socket

        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        down = ReadyCheck(closed, "m")
        out = subprocess.run(["bash", "-c", down.models_once_healthy(0.2).render()],
                             capture_output=True, text=True, timeout=30).stdout
        assert parse_models_once_healthy(out) == (0, [])
    finally:
        srv.shutdown()


def test_the_crash_loop_check_asks_once_when_state_and_restarts_are_one_command():
    """The venv's supervisor status answers both (one call during the gap); docker asks twice."""
    from pyalbert.runtimes import facts

    class Rt:
        def restarts(self, name):
            return Cmd.of("status", name)

        def parse_state(self, out):
            return out.startswith("running"), "", ""

        def parse_restarts(self, out):
            return int(out.split()[1])

    asked: list[str] = []

    class Runner:
        def run(self, cmd, check=True):
            asked.append(str(cmd))
            return Result(cmd, 0, "running 2\n" if cmd.tokens[0] == "status" else "stopped 0\n", "")

    venv = Unit(**{**unit("vllm-m", 8000, "x").__dict__, "probe": Cmd.of("status", "vllm-m")})
    assert facts.running_and_restarts(Runner(), Rt(), venv) == (True, 2)
    assert asked == ["status vllm-m"]
    asked.clear()
    docker = unit("vllm-m", 8000, "x")  # probe: another command than the restarts count
    assert facts.running_and_restarts(Runner(), Rt(), docker) == (False, 2)
    assert asked == ["probe vllm-m", "status vllm-m"]
