"""Facts: what the engine asks a host, each a command plus its parser returning a typed value.

Call sites ask for the fact (``units(runner, rt, env)``); nothing glues
``parse(run(list(...)).stdout)`` again.
"""

from __future__ import annotations

from typing import NamedTuple

from pyalbert.commands import vllm_cache
from pyalbert.remote import Runner
from pyalbert.runtimes.base import Runtime, Unit


class UnitState(NamedTuple):
    running: bool
    config_hash: str
    release: str


def units(runner: Runner, rt: Runtime, env: str, *, check: bool = True) -> list[dict[str, str]]:
    """This env's units on the host (name, service, model, state, release, config hash...).

    ``check=False``: an unreadable listing is no unit at all (probes before a first deploy).
    """
    res = runner.run(rt.list_units(env), check=check)
    return rt.parse_units(res.stdout) if res.ok else []


def running_names(runner: Runner, rt: Runtime, env: str) -> set[str]:
    return {row["name"] for row in units(runner, rt, env, check=False) if row["state"] == "running"}


def state(runner: Runner, rt: Runtime, unit: Unit) -> UnitState:
    """Is ``unit`` running, with which config hash, from which release (absent: not running)."""
    res = runner.run(unit.probe, check=False)
    return UnitState(*rt.parse_state(res.stdout)) if res.ok else UnitState(False, "", "")


def running_and_restarts(runner: Runner, rt: Runtime, unit: Unit) -> tuple[bool, int]:
    """:func:`state`'s running and :func:`restarts`, with one probe when the runtime asks both
    with the same command (the venv's ``albert supervise status``: a readiness wait's crash-loop
    check then costs one call, not two)."""
    res = runner.run(unit.probe, check=False)
    running = res.ok and rt.parse_state(res.stdout)[0]
    ask = rt.restarts(unit.name)
    return running, rt.parse_restarts(res.stdout if ask == unit.probe
                                      else runner.run(ask, check=False).stdout)


def restarts(runner: Runner, rt: Runtime, name: str) -> int:
    """How often the unit crashed and was restarted since its start (a crash loop)."""
    return rt.parse_restarts(runner.run(rt.restarts(name), check=False).stdout)


def warm(runner: Runner, unit: Unit) -> bool | None:
    """Does the unit's compile cache hold compiled artefacts (a warm start)? None: no cache."""
    if unit.warm_probe is None:
        return None
    return vllm_cache.parse_warm(runner.run(unit.warm_probe, check=False).stdout)


def cache_kib(runner: Runner, storage_dir: str) -> int:
    """Size of the host's vLLM compile cache (every tree), KiB; 0 when there is none."""
    return vllm_cache.parse_size_kib(runner.run(vllm_cache.size(storage_dir), check=False).stdout)
