"""``albert smoke [api|vllm] --env ENV``: check a deployed environment, one lane at a time.

``api`` (the default, the ``test:api`` job) goes end to end through the gateway; ``vllm`` (the
``test:vllm`` job) asks every vLLM server of the plan on its host, over SSH (servers listen on
loopback or a private address and need the servers' key, which stays on the host).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyalbert.ui import console, console_err

SERVICES = ("api", "vllm")


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert.cli import common_env

    smoke = sub.add_parser(
        "smoke", help="check a deployed environment: its api, or its vLLM servers (the pipeline's test jobs)",
        description="api (default): end to end through the gateway (ready, models listed, chat and "
                    "stream per model, bad key refused, whitelist header). vllm: every vLLM server "
                    "of the plan on its host over SSH (/health, /v1/models lists the served model, "
                    "one short completion). Exit status 1 when a check fails.")
    smoke.add_argument("service", nargs="?", choices=SERVICES, default="api",
                       help="what to check (default: api)")
    common_env(smoke)
    smoke.add_argument("--url", default=None,
                       help="api only: base URL (default: the environment's url, else its first api host)")
    smoke.add_argument("--junit", type=Path, default=None, help="write a JUnit XML report there")
    smoke.add_argument("--timeout", type=_positive, default=60.0,
                       help="per-request timeout in seconds (default 60)")
    smoke.add_argument("--wait", type=_positive, default=120.0,
                       help="how long to wait for the servers to come up (default 120 s)")
    smoke.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each test completion")
    smoke.set_defaults(func=smoke_command)


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return number


def target_for(args: argparse.Namespace):
    from pyalbert.config import load_spec, resolve_placement
    from pyalbert.errors import AlbertError
    from pyalbert.smoke import SmokeTarget

    spec = load_spec(args.env, args.config_dir)
    env = spec.env
    url = args.url or env.url or resolve_placement(spec).api[0].url
    ref = env.secrets["api_key"]
    key = ref.resolve()
    if key is None:
        raise AlbertError(
            f"the smoke test of {env.name} needs a client API key and {ref.env} is not set. "
            f"Fix: export {ref.env} with a key the gateway accepts (a masked CI/CD variable in "
            f"GitLab; key 'secrets.api_key' of {spec.env_file.name} names the variable)."
        )
    return SmokeTarget(env=env.name, url=url.rstrip("/"), api_key=key.get_secret_value(),
                       models=tuple(spec.models.ids()), whitelist_mode=env.api.whitelist_mode,
                       timeout_s=args.timeout, wait_s=args.wait, max_tokens=args.max_tokens)


def vllm_target_for(args: argparse.Namespace):
    from pyalbert.config import load_spec
    from pyalbert.errors import AlbertError
    from pyalbert.smoke import VllmSmokeTarget, vllm_servers

    if args.url:
        raise AlbertError("--url is the api's address; `albert smoke vllm` asks the servers of the "
                          "plan at their hosts' addresses. Fix: drop --url.")
    from pyalbert.runtimes.base import vllm_auth_header

    spec = load_spec(args.env, args.config_dir)
    servers = vllm_servers(spec.placement, vllm_auth_header(spec.env))
    if not servers:
        raise AlbertError(f"the plan of {spec.env.name} places no vLLM server on any host: nothing to "
                          f"check. Fix: give a host the vllm service in {spec.env_file.name}.")
    return spec, VllmSmokeTarget(env=spec.env.name, servers=servers, timeout_s=args.timeout,
                                 wait_s=args.wait, max_tokens=args.max_tokens)


def on_hosts_client(spec, target, runners=None):
    """An httpx client whose calls run on the servers' hosts (curl over the one executor)."""
    import httpx

    from pyalbert.engine.fanout import ssh_runners
    from pyalbert.smoke import HostTransport

    factory = runners or ssh_runners(spec)
    hosts = {h.name: h for h in spec.env.hosts}
    open_runners: dict = {}

    def run(host: str, cmd):
        if host not in open_runners:
            open_runners[host] = factory(hosts[host])
        return open_runners[host].run(cmd, check=False, timeout=target.timeout_s + 10)

    transport = HostTransport(target.servers, run, timeout_s=target.timeout_s)
    return httpx.Client(transport=transport, timeout=target.timeout_s + 15)


def smoke_command(args: argparse.Namespace) -> int:
    from pyalbert.smoke import run_smoke, run_vllm_smoke, summary_table, write_junit

    if args.service == "vllm":
        spec, target = vllm_target_for(args)
        console.print(f"smoke test of the vLLM servers of [bold]{target.env}[/] on their hosts: "
                      f"{len(target.servers)} server(s), "
                      + ", ".join(f"{s.model} at {s.host} {s.url}" for s in target.servers))
        with on_hosts_client(spec, target) as client:
            results = run_vllm_smoke(target, client)
    else:
        target = target_for(args)
        console.print(f"smoke test of [bold]{target.env}[/] at {target.url}: {len(target.models)} model(s), "
                      f"whitelist mode {target.whitelist_mode}")
        results = run_smoke(target)
    suite = f"albert-smoke-{target.env}" if args.service == "api" else f"albert-smoke-vllm-{target.env}"
    console.print(summary_table(results, f"albert smoke {args.service} {target.env}"))
    if args.junit:
        write_junit(args.junit, results, suite)
        console.print(f"JUnit report: {args.junit}")
    failed = [r for r in results if r.failed]
    for r in failed:
        console_err.print(f"[bold red]FAILED[/] {r.name}: {r.detail}", soft_wrap=True, highlight=False)
    if failed:
        console_err.print(f"[bold red]{len(failed)} of {len(results)} check(s) failed[/]")
        return 1
    console.print(f"[green]ok[/]: {len(results)} check(s) passed or skipped")
    return 0
