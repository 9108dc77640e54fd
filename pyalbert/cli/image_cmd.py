"""``albert image build|push`` and ``albert node spec``: baked images for managed GPU nodes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pyalbert.ui import console, console_err


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert.cli import common_env

    image = sub.add_parser("image", help="baked vLLM images for platforms that take no arguments")
    actions = image.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="build an image serving one routing-table model")
    common_env(build)
    _model_options(build)
    build.add_argument("--force", action="store_true", help="build even if the tag is up to date")
    build.add_argument("--dry-run", action="store_true", help="print the Dockerfile and command")
    build.set_defaults(func=build_command)

    push = actions.add_parser(
        "push", help="tag and push to an OCI registry ($REGISTRY_USER / $REGISTRY_TOKEN)")
    common_env(push)
    _model_options(push)
    push.add_argument("--registry", help="host[:port][/namespace] (default: the environment's)")
    push.add_argument("--dry-run", action="store_true", help="print the commands only")
    push.set_defaults(func=push_command)

    node = sub.add_parser("node", help="settings of a managed GPU node running a baked image")
    node_actions = node.add_subparsers(dest="action", metavar="ACTION", required=True)
    spec = node_actions.add_parser("spec", help="print the node's settings (JSON or YAML)")
    common_env(spec)
    _model_options(spec)
    spec.add_argument("--registry", help="registry the node pulls from (default: the environment's)")
    spec.add_argument("--format", choices=("json", "yaml"), default="json")
    spec.set_defaults(func=node_spec_command)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, help="model id (a routing-table key)")
    parser.add_argument("--bake-weights", action="store_true",
                        help="copy the weights from the storage dir into the image")
    parser.add_argument("--weights-dir", type=Path,
                        help="model directory to bake (default: <storage_dir>/<model id>)")
    parser.add_argument("--base", help="base image (default: the environment's images.vllm)")
    parser.add_argument("--tag", help="image reference (default: albert-<env>-vllm-<model>:<revision>)")
    parser.add_argument("--gpu-memory-gb", type=float,
                        help="memory of one target GPU for the preflight (default: the hosts')")


def _recipe(args: argparse.Namespace):
    from pyalbert.config import load_spec
    from pyalbert.image.recipe import recipe

    spec = load_spec(args.env, args.config_dir)
    return spec, recipe(spec, args.model, base=args.base, bake_weights=args.bake_weights,
                        weights_dir=args.weights_dir)


def _say(text: str) -> None:
    console_err.print(text, highlight=False, soft_wrap=True)


def build_command(args: argparse.Namespace) -> int:
    from pyalbert.image.build import build_image
    from pyalbert.remote import DryRunner, LocalRunner

    spec, rec = _recipe(args)
    runner = DryRunner("localhost") if args.dry_run else LocalRunner()
    outcome = build_image(spec, rec, ref=args.tag, runner=runner, dry_run=args.dry_run,
                          force=args.force, gpu_memory_gb=args.gpu_memory_gb, say=_say)
    if args.dry_run:
        sys.stdout.write(rec.dockerfile())
        for cmd in outcome.commands:
            console.print(f"$ {cmd.display()}", highlight=False, markup=False, soft_wrap=True)
    console.print(outcome.reason, highlight=False, markup=False)
    return 0


def push_command(args: argparse.Namespace) -> int:
    from pyalbert.image.build import push_image, registry_for

    spec, rec = _recipe(args)
    registry = registry_for(spec, args.registry)
    local = args.tag or rec.default_ref
    remote = registry.ref(rec.repository, rec.version)
    outcome = push_image(local, registry, remote_ref=remote, dry_run=args.dry_run, say=_say)
    for cmd in outcome.commands if args.dry_run else ():
        console.print(f"$ {cmd.display()}", highlight=False, markup=False, soft_wrap=True)
    console.print(outcome.reason, highlight=False, markup=False)
    return 0


def node_spec_command(args: argparse.Namespace) -> int:
    from pyalbert.image.build import Registry, preflight, target_gpu_memory_gb
    from pyalbert.image.node import dump, node_spec

    spec, rec = _recipe(args)
    registry = args.registry or spec.env.registry
    image = args.tag or (Registry.parse(registry).ref(rec.repository, rec.version)
                         if registry else rec.default_ref)
    memory = args.gpu_memory_gb or target_gpu_memory_gb(spec, args.model)
    estimate, skipped = preflight(spec, rec, gpu_memory_gb=memory)
    if skipped:
        _say(skipped)
    sys.stdout.write(dump(node_spec(rec, image=image, gpu_memory_gb=memory, estimate=estimate),
                          args.format))
    return 0
