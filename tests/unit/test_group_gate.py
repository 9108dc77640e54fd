"""The hosts of a Ray group record one release together or roll back together (issue 17)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from pyalbert.commands.base import Cmd
from pyalbert.engine.fanout import Interrupted
from pyalbert.engine.group_gate import GroupGate
from pyalbert.errors import AlbertError
from pyalbert.runtimes.base import Unit


def unit(name: str, service: str) -> Unit:
    c = Cmd.of("true")
    return Unit(name=name, service=service, config_hash="h", start=c, stop=c, probe=c, logs=c,
                ready=None)


def plan(host: str, *units: Unit):
    return SimpleNamespace(host=SimpleNamespace(name=host), units=units)


def in_thread(fn) -> dict:
    """Run ``fn`` in a thread; the dict gets its result or error once it ends."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def test_members_are_the_hosts_running_a_node_of_the_group():
    gate = GroupGate.of([
        plan("a", unit("albert-s-ray-ab", "ray"), unit("albert-s-vllm-big", "vllm")),
        plan("b", unit("albert-s-ray-ab", "ray")),
        plan("c", unit("albert-s-vllm-small", "vllm")),
    ])
    assert gate.members == {"albert-s-ray-ab": frozenset({"a", "b"})}
    assert gate.groups_of("a") == ["albert-s-ray-ab"] and gate.groups_of("c") == []


def test_a_host_waits_for_the_rest_of_its_group_then_records():
    gate = GroupGate({"g": frozenset({"a", "b"})})
    cancel = threading.Event()
    a = in_thread(lambda: gate.wait_all("a", cancel))
    a["thread"].join(0.5)
    assert a["thread"].is_alive()  # b has not got there yet: a does not record
    gate.wait_all("b", cancel)
    a["thread"].join(5)
    assert not a["thread"].is_alive() and "error" not in a


def test_when_one_host_fails_the_waiting_ones_roll_back_naming_it():
    gate = GroupGate({"g": frozenset({"head", "worker"})})
    worker = in_thread(lambda: gate.wait_all("worker", threading.Event()))
    gate.failed("head", "vllm m not ready within 30 s\nlast lines...")
    worker["thread"].join(5)
    err = worker["error"]
    assert isinstance(err, AlbertError)
    assert "head of the same host group (g) failed (vllm m not ready within 30 s)" in str(err)
    assert "rolls back with it" in str(err)


def test_a_failure_before_the_others_wait_is_seen_by_them():
    gate = GroupGate({"g": frozenset({"a", "b"})})
    gate.failed("a", "lock held by someone")
    with pytest.raises(AlbertError, match="a of the same host group"):
        gate.wait_all("b", threading.Event())


def test_an_unchanged_host_counts_as_there():
    gate = GroupGate({"g": frozenset({"a", "b"})})
    gate.arrive("b")  # nothing changed there
    gate.wait_all("a", threading.Event())  # returns at once


def test_hosts_of_no_group_never_wait():
    gate = GroupGate({"g": frozenset({"a", "b"})})
    gate.wait_all("c", threading.Event())
    gate.failed("c", "boom")  # no group to tell
    gate.arrive("a")
    gate.wait_all("b", threading.Event())


def test_ctrl_c_ends_the_wait():
    gate = GroupGate({"g": frozenset({"a", "b"})})
    cancel = threading.Event()
    a = in_thread(lambda: gate.wait_all("a", cancel))
    cancel.set()
    a["thread"].join(5)
    assert isinstance(a["error"], Interrupted)


def test_a_group_of_one_host_is_no_group():
    assert GroupGate({"g": frozenset({"a"})}).members == {}


def test_a_rollback_restores_the_group_holder_then_node_before_the_server_on_it():
    """Deployed in order (the PID-namespace holder, the node, then the server on it), undone in
    reverse, but the holder's undo first, then the node's: the previous node joins the previous
    holder and the previous server starts on the previous node, never on the failed release's."""
    from pyalbert.engine.host import HostDeploy

    done: list[str] = []

    def step(name: str, service: str | None = None):
        def undo() -> None:
            done.append(name)
        if service:
            undo.service = service
        return undo

    said: list[str] = []
    host = SimpleNamespace(name="head", say=lambda text, style="": said.append(text),
                           result=SimpleNamespace(status=""), prev_id="r1",
                           undo=[step("api colour", "api"), step("holder", "ray-pid"),
                                 step("node", "ray"), step("server", "vllm"), step("edge reload")])
    HostDeploy._roll_back(host, AlbertError("the server did not start"))
    assert done == ["holder", "node", "edge reload", "server", "api colour"]
    assert host.result.status == "rolled back" and host.undo == []


def test_a_host_failing_before_ready_gives_its_group_the_reason_not_a_log_header(monkeypatch):
    """The other hosts of the group quote the first line of the failed host's error: that line
    is the reason (the server exited), the log lines come after it and are not cut to a bare
    'Last log lines:'."""
    from pyalbert.engine import session as session_mod
    from pyalbert.engine.session import HostSession, NotReady

    s = HostSession.__new__(HostSession)
    s.name, s.rt = "head", None
    s.r = SimpleNamespace(run=lambda cmd, check=False: SimpleNamespace(
        stdout="loading\nValueError: no GPU left\n", known=True))
    monkeypatch.setattr(session_mod.facts, "running_and_restarts", lambda r, rt, u: (False, 0))
    with pytest.raises(NotReady) as err:
        s._refuse_crash_loop(unit("albert-s-vllm-big", "vllm"))
    assert str(err.value).splitlines()[-1] == "    ValueError: no GPU left"

    gate = GroupGate({"g": frozenset({"head", "worker"})})
    gate.failed("head", str(err.value))
    with pytest.raises(AlbertError) as rolled:
        gate.wait_all("worker", threading.Event())
    assert "(host head: albert-s-vllm-big exited before it was ready.)" in str(rolled.value)
