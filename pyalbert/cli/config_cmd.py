"""``albert config check --env ENV``: validate everything, print the resolved plan."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from pyalbert.config import load_spec, resolve_placement
from pyalbert.config.placement import Placement
from pyalbert.errors import ConfigError, Problem
from pyalbert.ui import console, console_err


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert.cli import common_env

    config = sub.add_parser("config", help="validate configuration and show the resolved plan")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate an environment and print hosts -> services")
    common_env(check)
    check.add_argument("--json", action="store_true", help="print the plan as JSON")
    check.set_defaults(func=check_command)


def plan_table(plan: Placement) -> Table:
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


def plan_json(plan: Placement) -> dict:
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


def preflight_problems(plan: Placement) -> tuple[list[Problem], list[str]]:
    """"Will it fit" for each GPU-served model whose weights' metadata is on this machine."""
    from pyalbert.image.build import preflight_model

    problems, notes = [], []
    spec = plan.spec
    for model_id in dict.fromkeys(i.model_id for i in plan.vllm if i.host.gpus):
        estimate, skipped = preflight_model(spec, model_id, strict=False)
        if estimate is None:
            notes.append(f"{model_id}: {skipped}")
        elif not estimate.fits:
            problems.append(Problem(str(spec.routing_file.name), f"{model_id}.gpu_mem_use",
                                    f"the model does not fit: {estimate.summary()}",
                                    "raise gpu_mem_use or tensor_parallel_size, lower "
                                    "max_model_len, or use a quantized model"))
    problems += args_problems(plan)
    return problems, notes


def args_problems(plan: Placement) -> list[Problem]:
    """What the deploy preflight refuses (the arguments against config.json), offline: for each
    model whose weights are on this machine under ``storage_dir``."""
    from pathlib import Path

    from pyalbert.runtimes.model_args import parse_config, problems

    spec, out = plan.spec, []
    for model_id, model in spec.models:
        path = Path(spec.env.storage_dir) / model_id / "config.json"
        config = parse_config(path.read_text()) if path.is_file() else None
        if config is None:
            continue
        for text in problems(model_id, config=config, path=str(path), max_model_len=model.max_model_len,
                             tensor_parallel_size=model.tensor_parallel_size,
                             quantization=model.quantization, env=model.env,
                             extra_args=(*spec.env.vllm.extra_args, *model.extra_args),
                             pipeline_parallel_size=model.pipeline_parallel_size):
            out.append(Problem(str(spec.routing_file.name), model_id, text))
    return out


def check_command(args: argparse.Namespace) -> int:
    spec = load_spec(args.env, args.config_dir)
    plan = resolve_placement(spec)
    for note in spec.notes:
        console_err.print(f"[yellow]warning:[/] {note}")
    problems, notes = preflight_problems(plan)
    for note in notes:
        console_err.print(f"[dim]{note}[/]")
    if problems:
        raise ConfigError(problems)
    if args.json:
        print(json.dumps(plan_json(plan), indent=2))
    else:
        console.print(plan_table(plan))
        console.print(f"[green]ok[/]: {len(plan.vllm)} vLLM server(s), {len(plan.api)} api on "
                      f"{len(spec.env.hosts)} host(s); files {spec.env_file} and {spec.routing_file}")
    return 0
