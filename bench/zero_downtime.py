"""Replace without downtime (issue 15): a routing-table change under constant client load.

    sudo .venv/bin/python bench/zero_downtime.py ["no room" [now]]   # optional: only these cases/modes

Namespace hosts, the venv runtime (the real gateway behind the edge, the fake vLLM streaming a
chunk every 50 ms, 1 s to load), 4 clients of the openai library (2 streaming, 2 plain, no
retries). For each case the model's arguments change once while the clients run:

- 1 replica with room on the host (the new server starts beside the old one),
- 1 replica without room (the RAM estimate made too large: restart in place),
- 2 replicas on 2 hosts without room (one host at a time, the gateway routes to the other).

"today" is the engine as it was before (stop, start on the same port, the gateway not told),
"now" the replace of :mod:`pyalbert.engine.vllm_replace`. Printed side by side: failed requests,
how many of them were 503 with Retry-After, the longest time without an answer, and the time from
"new server ready" to "the gateway routes to it" (the route written after readiness, to the
gateway's ``backends_reloaded`` log line).

The no-room row of "now" is split (:mod:`bench.restart_timeline`): the outage (first 503 -> the
first request sent after the last failure that is answered), the server's own start (its process
start -> its first healthy ``/health``, seen from inside the host) and the engine's overhead
(outage - start), step by step.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from bench.restart_timeline import EngineClock, ServerWatch, breakdown  # noqa: E402
from pyalbert.engine import host_plans, vllm_replace  # noqa: E402
from pyalbert.engine.operations import deploy_env, down_env  # noqa: E402
from pyalbert.runtimes import runtime_for  # noqa: E402
from tests.integration.test_ray_cluster import link_hosts  # noqa: E402
from tests.support.hosts import HostFactory  # noqa: E402
from tests.support.runtimes import Env, RuntimeHost, fake_vllm_python, tools_on  # noqa: E402
from tests.support.traffic import openai_load  # noqa: E402

SLOW = {"FAKE_VLLM_TOKEN_DELAY": "0.05", "FAKE_VLLM_START_DELAY": "1"}
#: the two hosts' ends of the link between them (10.211.<index>.1 and .2)
LINK: list[str] = []
CASES = [("1 replica, room", 1, "0"), ("1 replica, no room", 1, "100000"),
         ("2 replicas, 2 hosts, no room", 2, "100000")]


def longest_gap(times: list[float], start: float, end: float) -> float:
    inside = [start, *sorted(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in zip(inside, inside[1:], strict=False))


def reload_lags(env: Env, spec, writes: list[float]) -> list[float]:
    """Route write (after readiness) -> the gateway's ``backends_reloaded`` line, per write."""
    rt = runtime_for(spec.env)
    seen: list[float] = []
    for colour in ("blue", "green"):
        out = env.host.run(rt.logs(f"albert-{env.name}-api-{colour}", 2000).render(), check=False).stdout
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line[line.find("{"):])
                if rec.get("event") == "backends_reloaded":
                    seen.append(rec["ts"])
    return [min((s for s in seen if s >= w), default=float("nan")) - w for w in writes]


def private(env: Env, rhs: list[RuntimeHost]) -> None:
    """Hosts reach each other only over the link the bench made (``link_hosts``): their private
    addresses go in the environment file (gateways call the other host's server there)."""
    path = env.root / "environments" / f"{env.name}.toml"
    text = path.read_text()
    for i, rh in enumerate(rhs if len(rhs) > 1 else ()):
        text = text.replace(f'address = "{rh.host.address}"\n',
                            f'address = "{rh.host.address}"\nprivate_address = "{LINK[i]}"\n')
    path.write_text(text)


def run_case(rhs: list[RuntimeHost], title: str, replicas: int, kv: str, mode: str,
             n: int) -> dict:
    writes: list[float] = []
    original_point = vllm_replace.Gateways.point

    def point(self, slots, url, *args, **kwargs):
        if url is not None and not kwargs.get("check_first"):
            writes.append(time.time())
        return original_point(self, slots, url, *args, **kwargs)

    with tempfile.TemporaryDirectory(prefix="albert-zd-") as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm_replace.Gateways, "point", point)
        if mode == "today":
            mp.setattr(host_plans, "replace_settings", lambda placement: None)
        env = Env(rhs[0], Path(tmp) / "config", mp, f"zd{n}", others=tuple(rhs[1:replicas]))
        port = 18600 + n
        models = {"m-b": {"model": "org/b", "port": port, "replicas": replicas,
                          "env": {**SLOW, "VLLM_CPU_KVCACHE_SPACE": kv}}}
        env.write(models, api_port=18690 + n)
        private(env, rhs[:replicas])
        spec = env.spec()
        clock = EngineClock(mp) if mode == "now" and replicas == 1 else None
        watch = ServerWatch(rhs[0].host, port)
        try:
            deploy_env(spec, quiet=True)
            with watch.running(), openai_load(f"http://{env.host.address}:{18690 + n}", "m-b", clients=4) as load:
                time.sleep(2)
                models["m-b"]["extra_args"] = ["--max-num-seqs", "8"]
                env.write(models, api_port=18690 + n)
                private(env, rhs[:replicas])
                writes.clear()
                if clock:
                    clock.clear()
                t0 = time.monotonic()
                results = deploy_env(env.spec(), service="vllm", quiet=True)
                t1 = time.monotonic()
                time.sleep(2)
            assert all(r.ok for r in results), [(r.host, r.error) for r in results]
            lags = reload_lags(env, spec, writes) if writes and mode == "now" else []
        finally:
            down_env(env.spec())
    fails = load.failures
    return {"split": breakdown(load, clock, watch) if clock else None, "failed": len(fails), "total": load.ok + len(fails),
            "503+retry": sum(1 for f in fails if f[0] == 503 and f[1]),
            "gap": longest_gap(load.answered_at, t0, t1), "deploy": t1 - t0,
            "lag": max(lags) if lags else None, "kinds": sorted({str(f[0]) for f in fails})}


def print_rows(rows: list[tuple[str, dict]]) -> None:
    empty = {"failed": 0, "total": 0, "503+retry": 0, "gap": float("nan"), "lag": None}
    print(f"\n{'':30}{'failed today':>14}{'failed now':>12}{'503+RA now':>12}"
          f"{'gap today s':>13}{'gap now s':>11}{'ready->routed s':>17}")
    for title, row in rows:
        t, w = row.get("today", empty), row.get("now", empty)
        lag = f"{w['lag']:.3f}" if w["lag"] is not None else "-"
        print(f"{title:30}{t['failed']:>8}/{t['total']:<5}{w['failed']:>6}/{w['total']:<5}"
              f"{w['503+retry']:>12}{t['gap']:>13.2f}{w['gap']:>11.2f}{lag:>17}")
    print("targets: failed now = 0 with room and with 2 replicas; without room every failure a "
          "503 with Retry-After and the gap ~ the server's start; ready->routed <= 1 s")


def print_split(rows: list[tuple[str, dict]]) -> None:
    """The no-room restart: outage = the server's own start + the engine's overhead."""
    for title, row in rows:
        split = row.get("now", {}).get("split")
        if not split:
            continue
        print(f"\n{title} [now], seconds:")
        for what, value in split.items():
            print(f"  {what:28}{value:>8.2f}")
        if "overhead" in split:
            print("target: overhead (outage - server start) <= 1 s")


def main() -> int:
    factory = HostFactory()
    try:
        python = fake_vllm_python()
        rhs = []
        for i in range(2):
            h = factory(docker=False)
            tools_on(h, python, Path(tempfile.mkdtemp(prefix=f"albert-zd-tools{i}-")))
            rhs.append(RuntimeHost("venv", h, python))
        LINK.extend(link_hosts(rhs[0].host, rhs[1].host))
        rows = []
        n = 0
        only = sys.argv[1] if len(sys.argv) > 1 else ""
        modes = sys.argv[2:] or ["today", "now"]
        for title, replicas, kv in [c for c in CASES if only in c[0]]:
            row = {}
            for mode in modes:
                n += 1
                row[mode] = run_case(rhs, title, replicas, kv, mode, n)
                print(f"  {title} [{mode}]: {row[mode]}", flush=True)
            rows.append((title, row))
    finally:
        factory.close()
    print_rows(rows)
    print_split(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
