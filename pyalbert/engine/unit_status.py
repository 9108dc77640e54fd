"""What ``fab status`` says of each unit the current release declares (pure).

The release manifest lists every unit the release runs; the host's listing says what runs. A unit
declared but not listed is ``stopped`` (a stopped venv process is no longer listed, like a removed
container), a listed one is ``failed`` (gave up, or its supervisor died), ``crash-looping``
(``CRASH_LOOP_RESTARTS`` restarts within ``CRASH_LOOP_WINDOW_S``, or docker's ``restarting``),
``not ready`` (its health probe is not 200) or ``running``. Only ``running`` serves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CRASH_LOOP_WINDOW_S = 600
CRASH_LOOP_RESTARTS = 2


def declared(manifest: Mapping) -> list[dict[str, str]]:
    """Units of a release manifest: name, service, model (the api: its colours' common name)."""
    return [{"name": u["name"], "service": u["service"], "model": u.get("model") or ""}
            for u in manifest.get("units", [])]


def _matches(decl: Mapping, row: Mapping) -> bool:
    if decl["service"] == "api":  # albert-<env>-api-*: whichever colour serves
        return row.get("service") == "api"
    return row.get("name") == decl["name"]


def verdict(row: Mapping, *, now: float) -> str:
    state = row.get("state", "")
    if state in ("restarting",):
        return "crash-looping"
    if state != "running":
        return "failed" if state else "stopped"
    recent = [t for t in row.get("restart_times") or () if now - float(t) <= CRASH_LOOP_WINDOW_S]
    if len(recent) >= CRASH_LOOP_RESTARTS:
        return "crash-looping"
    health = row.get("health", "-")
    if health not in ("-", "ok"):
        return "not ready"
    return "running"


def judge(manifest: Mapping | None, rows: Sequence[Mapping], *, now: float) -> tuple[list[dict], list[str]]:
    """(rows with a ``verdict``, the declared units that do not serve, as "name: verdict").

    Declared units missing from ``rows`` are added as ``stopped``; an api declared as colours
    serves when one colour runs."""
    out = [{**row, "verdict": verdict(row, now=now)} for row in rows]
    bad: list[str] = []
    for decl in declared(manifest or {}):
        mine = [r for r in out if _matches(decl, r)]
        if not mine:
            out.append({"name": decl["name"], "image": "", "release": "", "ports": "",
                        "state": "stopped", "status": "stopped (declared by the release)",
                        "service": decl["service"], "model": decl["model"], "health": "-",
                        "verdict": "stopped"})
            bad.append(f"{decl['name']}: stopped")
        elif not any(r["verdict"] == "running" for r in mine):
            bad.extend(f"{r['name']}: {r['verdict']}" for r in mine)
    return out, bad
