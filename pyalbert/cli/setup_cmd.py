"""``albert download_models`` (aliases ``download-models`` and ``download_model``, the original
deployment guide's spelling): the setup stage's model fetch."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from pyalbert.ui import console


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert.cli import common_env

    cmd = sub.add_parser(
        "download_models", aliases=["download-models", "download_model"],
        help="fetch the routing table's models from the hub into the storage dir",
        description="Fetch each model of the environment's routing table at its pinned revision "
                    "into STORAGE_DIR/<model id> (verified, with .albert-manifest.json). Already "
                    "installed models are checked from their manifest without network. "
                    "HF_TOKEN (secret 'hf_token') is used for gated repos; HF_ENDPOINT and "
                    "HF_HUB_OFFLINE=1 are honoured. `download_model` (the original deployment guide's "
                    "spelling) is the same command.")
    common_env(cmd)
    cmd.add_argument("--storage-dir", type=Path, default=None,
                     help="where models go (default: the environment's storage_dir)")
    cmd.add_argument("--model", dest="models", action="append", metavar="ID",
                     help="only this model id of the routing table (repeatable)")
    cmd.add_argument("--refresh", action="store_true",
                     help="ask the hub whether a branch/tag revision moved (a commit sha never does)")
    cmd.add_argument("--parallel", type=int, default=2, metavar="N",
                     help="models downloaded at the same time (default 2)")
    cmd.add_argument("--files-per-model", type=int, default=4, metavar="N",
                     help="concurrent file transfers per model (default 4)")
    cmd.set_defaults(func=download_models_command)


def results_table(results) -> Table:
    from pyalbert.hub.progress import human_bytes

    table = Table(title="models")
    for col in ("model", "repo@revision", "commit", "status", "files", "fetched", "reused",
                "size", "seconds", "rate", "path"):
        table.add_column(col)
    colour = {"downloaded": "green", "updated": "green", "up-to-date": "cyan", "failed": "red"}
    for r in results:
        table.add_row(
            r.model_id, f"{r.repo}@{r.revision}", r.commit[:12] or "-",
            f"[{colour[r.status]}]{r.status}[/]", str(r.files or "-"), str(r.files_fetched),
            str(r.files_reused), human_bytes(r.bytes_total) if r.bytes_total else "-",
            f"{r.seconds:.2f}", f"{human_bytes(r.bytes_per_s)}/s" if r.bytes_fetched else "-",
            str(r.path))
    return table


def download_models_command(args: argparse.Namespace) -> int:
    from pyalbert.config import load_spec
    from pyalbert.hub import DownloadsFailed, download_models
    from pyalbert.hub.progress import default_reporter

    spec = load_spec(args.env, args.config_dir)
    try:
        results = download_models(spec, args.storage_dir, args.models, refresh=args.refresh,
                                  max_parallel=args.parallel, files_per_model=args.files_per_model,
                                  reporter=default_reporter())
    except DownloadsFailed as exc:
        console.print(results_table(exc.results))
        raise
    console.print(results_table(results))
    changed = sum(r.status in ("downloaded", "updated") for r in results)
    console.print(f"[green]ok[/]: {len(results)} model(s) in "
                  f"{args.storage_dir or spec.env.storage_dir}; "
                  + (f"{changed} changed" if changed else "nothing changed"))
    return 0
