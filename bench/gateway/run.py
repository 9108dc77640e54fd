"""Gateway benchmark: direct vs our gateway vs a naive FastAPI+httpx proxy vs LiteLLM's proxy.

    .venv/bin/python bench/gateway/run.py [--setup] [--duration 4] [--targets direct,gateway,naive,litellm]
    .venv/bin/python bench/gateway/run.py --targets direct,gateway,edge.py,haproxy,haproxy+tls,nginx,nginx+tls,caddy,caddy+tls
                                          [--whitelist-mode off|flag|redact]
    .venv/bin/python bench/gateway/run.py --targets direct,gateway,haproxy@REV,haproxy,haproxy~nodelay
                                          (a HAProxy tuning before/after: bench/gateway/proxies.py;
                                          haproxy~tcp: HAProxy to its gateway over loopback TCP
                                          instead of its unix socket, as shipped)
                                          [--rounds 3: the list measured 3 times in turn; the
                                          front-door CPU shares are medians over the rounds]

One instant fake upstream (tests/support/fake_upstream.py, its own process), one load tool for
every target (bench/gateway/load.py: closed-loop keep-alive clients), concurrency 1 and 64, plain
and streamed chat completions. Each target is one server process (workers = 1), started alone,
measured, stopped. Printed side by side: req/s, p50/p99, added p50 vs direct, server CPU ms per
request (every thread's run time, /proc/<pid>/task/*/schedstat in ns, over the measured window), SSE chunks/s, and the ratios the
targets of issue 8 are about (its CPU target is for whitelist mode ``off``, the default here;
``--whitelist-mode flag`` measures the answer checks too). The naive proxy and LiteLLM run from a separate venv
(``--setup`` creates it in .cache/bench/venv); without it they are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies  # noqa: E402 - bench/gateway/proxies.py

from pyalbert.devtools.test_ca import make_test_ca  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BENCH_VENV = REPO / ".cache" / "bench" / "venv"
CHUNKS = 20  # content chunks per streamed answer (+ role chunk + finish chunk)
SCENARIOS = [("plain", 1), ("plain", 64), ("stream", 1), ("stream", 64)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90, verify: str | bool = True) -> None:
    """Until ``url`` answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            with httpx.Client(verify=verify, timeout=1) as client:
                if client.get(url).status_code < 500:
                    return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not up within {timeout} s")


@contextmanager
def process(argv: list[str], ready_url: str, env: dict | None = None, cwd: Path = REPO,
            verify: str | bool = True):
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(ready_url, proc, verify=verify)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load(url: str, scenario: str, concurrency: int, duration: float, pids: list[int],
         key: str | None, cafile: str | None = None) -> dict:
    argv = [sys.executable, str(HERE / "load.py"), "--url", url, "-c", str(concurrency),
            "--duration", str(duration), "--warmup", "1", "--model", "fake"]
    if scenario == "stream":
        argv.append("--stream")
    for pid in pids:
        argv += ["--cpu-pid", str(pid)]
    if cafile:
        argv += ["--cafile", cafile]
    if key:
        argv += ["--key", key]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def setup_venv() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]", "fastapi",
                    "httpx", "uvicorn[standard]"], check=True)


def targets(upstream: str, workdir: Path, wanted: list[str], whitelist_mode: str = "off"):
    """(name, context manager yielding (url, pids, key), why not) for each target.

    A front-door target (``haproxy``, ``haproxy+tls``, ``edge.py`` ...) is a gateway behind the
    proxy: its CPU is both processes'."""
    key = "bench-" + secrets.token_urlsafe(24)

    @contextmanager
    def direct():
        yield upstream, [], None

    @contextmanager
    def gateway(uds: Path | None = None):
        """The gateway on a loopback port, and on the unix socket ``uds`` too (``--uds``)."""
        import hashlib

        keys = workdir / "keys.json"
        keys.write_text(json.dumps([{"name": "bench", "sha256": hashlib.sha256(key.encode()).hexdigest()}]))
        port = free_port()
        argv = [sys.executable, "-c", "from pyalbert.cli import run; run()", "api",
                "--backends", json.dumps({"fake": [upstream]}), "--keys", str(keys),
                "--host", "127.0.0.1", "--port", str(port), *(["--uds", str(uds)] if uds else []),
                "--workers", "1", "--whitelist-mode", whitelist_mode]
        with process(argv, f"http://127.0.0.1:{port}/health") as proc:
            yield f"http://127.0.0.1:{port}", [proc.pid], key

    @contextmanager
    def naive():
        port = free_port()
        argv = [str(BENCH_VENV / "bin" / "uvicorn"), "naive_proxy:app", "--host", "127.0.0.1",
                "--port", str(port), "--http", "httptools", "--loop", "uvloop", "--no-access-log",
                "--log-level", "warning"]
        with process(argv, f"http://127.0.0.1:{port}/health", {"UPSTREAM": upstream}, HERE) as proc:
            yield f"http://127.0.0.1:{port}", [proc.pid], None

    @contextmanager
    def litellm():
        port = free_port()
        config = workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n  - model_name: fake\n    litellm_params:\n      model: openai/fake\n"
            f"      api_base: {upstream}/v1\n      api_key: none\n"
            "litellm_settings:\n  telemetry: false\n")
        argv = [str(BENCH_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                "--port", str(port), "--num_workers", "1"]
        master = "sk-" + secrets.token_hex(24)  # LiteLLM refuses to start without a key
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_MASTER_KEY": master}
        with process(argv, f"http://127.0.0.1:{port}/health/liveliness", env, workdir) as proc:
            yield f"http://127.0.0.1:{port}", [proc.pid], master

    def front(name: str, tls: bool):
        @contextmanager
        def behind_proxy():
            work = workdir / (name.replace("@", "-").replace("~", "-") + ("-tls" if tls else ""))
            work.mkdir(parents=True, exist_ok=True)
            uds = work / "gateway.sock" if proxies.uses_uds(name) else None
            with gateway(uds) as (gw_url, gw_pids, gw_key):
                upstream_port = int(gw_url.rsplit(":", 1)[1])
                ca = make_test_ca(workdir / "ca") if tls else None
                with proxies.proxy(name, work, free_port(), upstream_port, ca, process, uds) as (url, pid):
                    yield url, [*gw_pids, pid], gw_key
        return behind_proxy

    have_venv = (BENCH_VENV / "bin" / "uvicorn").exists()
    table = {"direct": (direct, ""), "gateway": (gateway, ""),
             "naive": (naive, "" if have_venv else "no bench venv (run with --setup)"),
             "litellm": (litellm, "" if (BENCH_VENV / "bin" / "litellm").exists()
                         else "litellm[proxy] not installed (run with --setup)")}
    for name in proxies.PROXIES:
        for tls in (False, True):
            if name != "edge.py" or not tls:
                table[name + ("+tls" if tls else "")] = (front(name, tls), proxies.missing(name))
    for name in wanted:  # HAProxy variants: haproxy@REV, haproxy~TWEAK (+tls)
        if name not in table and proxies.base_name(name) == "haproxy":
            plain = name.removesuffix("+tls")
            table[name] = (front(plain, plain != name), proxies.missing(plain))
    return [(name, *table[name]) for name in wanted]


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def report(results: dict, skipped: dict, rounds: dict) -> None:
    names = list(results)
    for scenario, c in SCENARIOS:
        tag = f"{scenario} c={c}"
        print(f"\n== {tag} ==")
        print(f"{'target':<14}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'cpu ms/req':>12}"
              f"{'req/cpu-s':>11}{'chunks/s':>11}{'errors':>8}")
        base = results.get("direct", {}).get(tag)
        for name in names:
            r = results[name].get(tag)
            if r is None:
                continue
            added = r["p50_ms"] - base["p50_ms"] if base and name != "direct" else None
            cpu = r["cpu_ms_per_req"]
            capacity = 1000 / cpu if cpu else None
            print(f"{name:<14}{r['rps']:>10.1f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.2f}{fmt(added, '.3f'):>9}"
                  f"{fmt(cpu, '.3f'):>12}{fmt(capacity, '.0f'):>11}{fmt(r['chunks_per_s'] or None, '.0f'):>11}"
                  f"{r['errors']:>8}")
    for name, why in skipped.items():
        print(f"\n{name}: skipped: {why}")
    front_doors(results, rounds)
    g = results.get("gateway", {})
    if not g:
        return
    print("\n== targets (issue 8, one gateway process) ==")
    checks = []
    p1, p64, s64 = g.get("plain c=1"), g.get("plain c=64"), g.get("stream c=64")
    d1 = results.get("direct", {}).get("plain c=1")
    if p1 and d1:
        checks.append(("added p50 at c=1 <= 0.5 ms", p1["p50_ms"] - d1["p50_ms"], 0.5, "<="))
    if p1 and p1["cpu_ms_per_req"] is not None:
        cpu = min(x["cpu_ms_per_req"] for x in (p1, p64) if x and x["cpu_ms_per_req"] is not None)
        checks.append(("CPU per plain request <= 0.5 ms", cpu, 0.5, "<="))
    if p64:
        checks.append(("p99 at c=64 <= 50 ms", p64["p99_ms"], 50, "<="))
        for other, factor in (("naive", 3), ("litellm", 20)):
            o = results.get(other, {}).get("plain c=64")
            if o and o["rps"]:
                checks.append((f"c=64 throughput >= {factor}x {other}", p64["rps"] / o["rps"], factor, ">="))
    if s64:
        checks.append(("SSE chunks/s >= 20000", s64["chunks_per_s"], 20000, ">="))
        if s64["cpu_ms_per_req"] and s64["requests"]:
            per_req = s64["chunks"] / s64["requests"]
            print(f"  info  SSE chunks per gateway CPU-second: {per_req * 1000 / s64['cpu_ms_per_req']:,.0f} "
                  "(what one fully available core relays)")
    for label, value, limit, op in checks:
        ok = value <= limit if op == "<=" else value >= limit
        print(f"  {'PASS' if ok else 'MISS'}  {label:<34} measured {value:,.2f}")


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def front_doors(results: dict, rounds: dict) -> None:
    """Issue 16: what each proxy adds to the gateway, side by side, and its targets.

    CPU per streamed request three ways, each the median over ``--rounds`` (min-max shown):
    ``own % gw`` is the proxy's process tree as a share of its own gateway's over the same
    requests (one run, so a busy spell on the machine hits both); ``% alone`` is the proxy's
    over the gateway alone's (the gateway as clients reached it before there was a proxy);
    ``path +%`` is issue 16's definition (its edge.py "+94%"): proxy + gateway behind it over
    the gateway alone, which compares separate runs (noisier) and counts what the gateway saves
    or pays behind a proxy (over a unix socket it pays less than on TCP)."""
    g = results.get("gateway", {})
    doors = [n for n in results if proxies.base_name(n) in proxies.PROXIES]
    if not g or not doors:
        return
    g1, gs64 = g.get("plain c=1"), g.get("stream c=64")
    alone = {tag: median([r["cpu_ms_per_req"] for r in rounds["gateway"][tag]])
             for tag in ("plain c=64", "stream c=64")}
    print("\n== front door (issue 16): what the proxy adds to the gateway ==")
    print(f"{'path':<14}{'+p50 c=1 ms':>12}{'proxy cpu/req':>14}{'own % gw':>9}{'proxy cpu/stream':>17}"
          f"{'own % gw (min-max)':>20}{'% alone':>9}{'path +%':>9}{'streams/s c=64':>15}")

    def shares(name: str, tag: str):
        """(proxy ms, own %, min %, max %, path +%) per request, medians over the rounds."""
        runs = [r["cpu_ms_per_req_each"] for r in rounds[name][tag]]  # [gateway, proxy] each
        own = [100 * proxy / gw for gw, proxy in runs]
        path = 100 * median([gw + proxy for gw, proxy in runs]) / alone[tag] - 100
        return median([proxy for _, proxy in runs]), median(own), min(own), max(own), path

    print(f"{'gateway alone':<14}{'-':>12}{alone['plain c=64']:>14.3f}{'':>9}"
          f"{alone['stream c=64']:>17.3f}{'':>20}{'':>9}{'':>9}{gs64['rps']:>15.0f}")
    checks = []
    for name in doors:
        r = results[name]
        added = r["plain c=1"]["p50_ms"] - g1["p50_ms"]
        req, req_own, *_ = shares(name, "plain c=64")
        stream, own, low, high, path = shares(name, "stream c=64")
        print(f"{name:<14}{added:>12.3f}{req:>14.3f}{req_own:>8.0f}%{stream:>17.3f}"
              f"{f'{own:.1f}% ({low:.0f}-{high:.0f})':>20}{100 * stream / alone['stream c=64']:>8.1f}%"
              f"{path:>8.0f}%{r['stream c=64']['rps']:>15.0f}")
        if name == "edge.py":
            continue
        if name.endswith("+tls"):
            plain = results.get(name.removesuffix("+tls"))
            if plain:
                more = r["plain c=1"]["p50_ms"] - plain["plain c=1"]["p50_ms"]
                checks.append((f"{name}: TLS keep-alive adds <= 0.1 ms p50", more, 0.1))
        else:
            checks.append((f"{name}: adds <= 0.15 ms p50 at c=1", added, 0.15))
            checks.append((f"{name}: own CPU per stream <= 25% of gateway's", own, 25))
            checks.append((f"{name}: path CPU per stream <= gateway alone +25%", path, 25))
    for label, value, limit in checks:
        print(f"  {'PASS' if value <= limit else 'MISS'}  {label:<50} measured {value:,.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--targets", default="direct,gateway,naive,litellm")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per target and scenario; the one with the most req/s is shown "
                             "(a shared machine's noise hits every target alike)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the whole target list this many times, in turn, keeping each "
                             "target's best run: a busy spell on the machine hits one round, not one target")
    parser.add_argument("--setup", action="store_true", help="create the venv with litellm and fastapi")
    parser.add_argument("--whitelist-mode", choices=("off", "flag", "redact"), default="off",
                        help="the gateway's answer checks (issue 8's CPU target is for off)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args()
    if args.setup and not (BENCH_VENV / "bin" / "litellm").exists():
        setup_venv()
    results: dict[str, dict] = {}
    rounds: dict[str, dict[str, list]] = {}  # every round's run of each target and scenario
    skipped: dict[str, str] = {}
    port = free_port()
    fake_argv = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port),
                 "--chunks", str(CHUNKS)]
    upstream = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp, process(fake_argv, upstream + "/health"):
        wanted = args.targets.split(",")
        for round_no in range(args.rounds):
            for name, target, why in targets(upstream, Path(tmp), wanted, args.whitelist_mode):
                if why or name in skipped:
                    skipped[name] = skipped.get(name) or why
                    continue
                print(f"measuring {name} (round {round_no + 1}/{args.rounds}) ...", file=sys.stderr, flush=True)
                try:
                    with target() as (url, pids, key):
                        cafile = str(Path(tmp) / "ca" / "ca.pem") if url.startswith("https") else None
                        for scenario, c in SCENARIOS:
                            tag = f"{scenario} c={c}"
                            runs = [load(url, scenario, c, args.duration, pids, key, cafile)
                                    for _ in range(args.repeat)]
                            rounds.setdefault(name, {}).setdefault(tag, []).append(
                                max(runs, key=lambda r: r["rps"]))
                            runs += [results[name][tag]] if round_no else []
                            results.setdefault(name, {})[tag] = max(runs, key=lambda r: r["rps"])
                except (RuntimeError, subprocess.CalledProcessError) as exc:
                    skipped[name] = f"failed: {exc}"
                    results.pop(name, None)
                    rounds.pop(name, None)
    print(f"gateway whitelist mode: {args.whitelist_mode}")
    report(results, skipped, rounds)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "rounds": rounds, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
