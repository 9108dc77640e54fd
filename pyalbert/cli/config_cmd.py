"""``albert config check --env ENV``: validate everything, print the resolved plan."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from pyalbert.config import load_spec, resolve_plan
from pyalbert.config.plan import Plan
from pyalbert.ui import console, console_err


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert.cli import common_env

    config = sub.add_parser("config", help="validate configuration and show the resolved plan")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate an environment and print hosts -> services")
    common_env(check)
    check.add_argument("--json", action="store_true", help="print the plan as JSON")
    check.set_defaults(func=check_command)


def plan_table(plan: Plan) -> Table:
    env = plan.spec.env
    table = Table(title=f"environment {env.name} ({env.tier}, runtime {env.runtime})")
    for col in ("host", "service", "name", "model", "port", "GPUs", "gpu_mem_use", "TP"):
        table.add_column(col)
    for host in env.hosts:
        where = f"{host.name}\n{host.user}@{host.address}:{host.port}"
        for inst in plan.vllm_on(host.name):
            gpus = ",".join(map(str, inst.gpu_ids)) if inst.gpu_ids else "cpu"
            m = inst.model
            table.add_row(where, "vllm", inst.name, f"{inst.model_id}\n{m.model}@{m.revision or 'main'}",
                          str(inst.port), gpus, f"{m.gpu_mem_use:g}", str(m.tensor_parallel_size))
            where = ""
        for api in plan.api_on(host.name):
            table.add_row(where, "api", api.name, "all", str(api.port), "-", "-", "-")
            where = ""
    return table


def plan_json(plan: Plan) -> dict:
    return {
        "environment": plan.spec.env.name,
        "runtime": plan.spec.env.runtime,
        "vllm": [
            {"name": i.name, "model_id": i.model_id, "model": i.model.model, "revision": i.model.revision,
             "host": i.host.name, "port": i.port, "gpus": list(i.gpu_ids)}
            for i in plan.vllm
        ],
        "api": [{"name": a.name, "host": a.host.name, "port": a.port} for a in plan.api],
        "backends": plan.backends,
    }


def check_command(args: argparse.Namespace) -> int:
    spec = load_spec(args.env, args.config_dir)
    plan = resolve_plan(spec)
    for note in spec.notes:
        console_err.print(f"[yellow]warning:[/] {note}")
    if args.json:
        print(json.dumps(plan_json(plan), indent=2))
    else:
        console.print(plan_table(plan))
        console.print(f"[green]ok[/]: {len(plan.vllm)} vLLM server(s), {len(plan.api)} api on "
                      f"{len(spec.env.hosts)} host(s); files {spec.env_file} and {spec.routing_file}")
    return 0
