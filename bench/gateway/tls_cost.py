"""What the front door and its TLS add to one request's latency, measured with a C client.

    .venv/bin/python bench/gateway/tls_cost.py [--duration 3] [--rounds 5]
                                               [--targets gateway,haproxy,haproxy+tls]

Issue 16's latency targets: the proxy adds <= 0.15 ms p50 at c=1 over the gateway alone, and
TLS keep-alive adds <= 0.1 ms more. ``run.py`` drives every target with a Python client
(``load.py``); over TLS that client's own work (asyncio's SSL transport, a memory BIO per
read and write) is in each figure, and it is about as large as the target. Clients that
matter (curl, the openai client's httpx over OpenSSL, browsers) do not pay it per request the
same way, so here the client is ``wrk`` (C, OpenSSL): one thread, one keep-alive connection
(the handshake before the measured window), a chat completion per request, plain and
streamed (20 events). The targets are started by ``run.py``'s own code (same gateway, same
HAProxy config as the deploy renders, same test CA), in turn, ``--rounds`` times; a figure
is the median over the rounds of wrk's p50.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 - bench/gateway/run.py

WRK = "wrk"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
#: the target each added latency is judged against (ms), and what it is added to
TARGETS = (("haproxy", "gateway", 0.15, "the proxy over the gateway alone"),
           ("haproxy+tls", "haproxy", 0.10, "TLS keep-alive over the proxy's plain HTTP"))


def wrk_script(folder: Path, key: str | None, stream: bool) -> Path:
    body = json.dumps({"model": "fake", "stream": stream, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "Say hello."}]})
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body)}",
             'wrk.headers["Content-Type"] = "application/json"']
    if key:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
    path = folder / f"chat-{'stream' if stream else 'plain'}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def p50_ms(wrk_output: str) -> float:
    """wrk's ``--latency`` line ``50%  123.00us`` in ms."""
    m = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s)\s*$", wrk_output, re.MULTILINE)
    if not m:
        raise RuntimeError(f"no p50 in wrk's output:\n{wrk_output}")
    return float(m.group(1)) * UNITS[m.group(2)]


def measure(url: str, script: Path, duration: float) -> float:
    argv = [WRK, "-t1", "-c1", f"-d{duration:g}s", "--latency", "-s", str(script),
            f"{url}/v1/chat/completions"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"{url}: non-2xx answers:\n{out}")
    return p50_ms(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--targets", default="gateway,haproxy,haproxy+tls")
    args = parser.parse_args()
    if not shutil.which(WRK):
        sys.exit("wrk is not installed: ./scripts/bootstrap installs it (apt-get install wrk)")
    wanted = args.targets.split(",")
    p50s: dict[str, dict[str, list[float]]] = {}
    port = run.free_port()
    upstream = f"http://127.0.0.1:{port}"
    fake = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port),
            "--chunks", str(run.CHUNKS)]
    with tempfile.TemporaryDirectory() as tmp, run.process(fake, upstream + "/health"):
        for round_no in range(args.rounds):
            for name, target, why in run.targets(upstream, Path(tmp), wanted):
                if why:
                    sys.exit(f"{name}: {why}")
                print(f"measuring {name} (round {round_no + 1}/{args.rounds}) ...",
                      file=sys.stderr, flush=True)
                with target() as (url, _pids, key):
                    for scenario in ("plain", "stream"):
                        script = wrk_script(Path(tmp), key, scenario == "stream")
                        p50s.setdefault(name, {}).setdefault(scenario, []).append(
                            measure(url, script, args.duration))
    report(p50s, args.rounds)


def report(p50s: dict[str, dict[str, list[float]]], rounds: int) -> None:
    median = {n: {s: statistics.median(v) for s, v in by.items()} for n, by in p50s.items()}
    print(f"p50 at c=1, wrk (one keep-alive connection), median of {rounds} rounds (min-max):")
    print(f"  {'target':<14}{'plain':>22}{'stream (20 events)':>26}")
    for name, by in p50s.items():
        cells = [f"{median[name][s]:.3f} ms ({min(v):.3f}-{max(v):.3f})" for s, v in by.items()]
        print(f"  {name:<14}" + "".join(f"{c:>24}" for c in cells))
    for name, base, limit, what in TARGETS:
        if name not in median or base not in median:
            continue
        for scenario in ("plain", "stream"):
            added = median[name][scenario] - median[base][scenario]
            verdict = "PASS" if added <= limit else "MISS"
            print(f"  {verdict}  {what}, {scenario}: +{added:.3f} ms (target <= {limit} ms)")


if __name__ == "__main__":
    main()
