"""``albert api``: run the OpenAI-compatible gateway; ``albert api hash-key``: store a key."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from pyalbert.cli import common_env
from pyalbert.errors import AlbertError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "api",
        help="run the OpenAI-compatible gateway in front of the vLLM servers",
        description="Run the gateway of an environment (routing from its plan, settings from "
                    "[api]; keys from $ALBERT_API_KEYS). Keys file format: see "
                    "pyalbert/api/keys.py. SIGHUP reloads keys and whitelist.",
    )
    common_env(parser, required=False)
    parser.add_argument("--host", default=None, help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="port (default: api.port)")
    parser.add_argument("--uds", default=None, metavar="PATH",
                        help="also listen on this unix socket (the front door's; its "
                             "X-Forwarded-For is trusted, never the TCP port's)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: api.workers)")
    parser.add_argument("--backends", default=None, metavar="JSON|FILE",
                        help='routing override: {"model id": ["http://host:port", ...]}')
    parser.add_argument("--routes", default=None, metavar="DIR",
                        help="folder of per-replica routes written by the deploy during a model "
                             "replace; watched, applied without a restart")
    parser.add_argument("--keys", default=None, metavar="FILE", help="keys file (default: $ALBERT_API_KEYS)")
    parser.add_argument("--upstream-key", default=None, metavar="FILE",
                        help="file with the model servers' key (sent to them as a Bearer token)")
    parser.add_argument("--whitelist", default=None, metavar="FILE", help="whitelist JSON file")
    parser.add_argument("--whitelist-mode", choices=("off", "flag", "redact"), default=None,
                        help="default: api.whitelist_mode")
    parser.add_argument("--no-auth", action="store_true", help="accept every caller (tests, laptops)")
    parser.add_argument("--no-metrics-auth", action="store_true",
                        help="/metrics open to all (default: api.metrics_auth, a scrape key)")
    parser.add_argument("--no-access-log", action="store_true", help="no JSON access log lines")
    parser.set_defaults(func=run_api)
    inner = parser.add_subparsers(dest="api_command", metavar="")
    hash_parser = inner.add_parser("hash-key", help="print the stored form of a key read from stdin")
    hash_parser.set_defaults(func=run_hash_key)


def settings_from_args(args: argparse.Namespace):
    from pyalbert.api.settings import GatewaySettings, parse_backends, settings_from_spec

    backends = parse_backends(args.backends) if args.backends else None
    overrides = {
        "host": args.host, "port": args.port, "uds": args.uds, "workers": args.workers,
        "whitelist_mode": args.whitelist_mode,
        "whitelist_path": str(Path(args.whitelist)) if args.whitelist else None,
        "keys_path": args.keys,
        "routes_dir": args.routes,
        "upstream_key_path": args.upstream_key,
        "open_access": True if args.no_auth else None,
        "metrics_auth": False if args.no_metrics_auth else None,
        "access_log": False if args.no_access_log else None,
    }
    if args.env:
        from pyalbert.config import load_spec

        spec = load_spec(args.env, args.config_dir)
        return settings_from_spec(spec, backends, **overrides)
    if backends is None:
        raise AlbertError("`albert api` needs --env ENV (routing and settings of an environment) "
                          "or --backends JSON|FILE. Fix: e.g. `albert api --env local`.")
    import os

    overrides.setdefault("keys_path", None)
    if overrides["keys_path"] is None and os.environ.get("ALBERT_API_KEYS"):
        overrides["keys_path"] = os.environ["ALBERT_API_KEYS"]
    return GatewaySettings(backends=backends).with_(**overrides)


def run_api(args: argparse.Namespace) -> int:
    from pyalbert.api.server import serve

    serve(settings_from_args(args))
    return 0


def run_hash_key(args: argparse.Namespace) -> int:
    from pyalbert.api.keys import hash_key

    key = getpass.getpass("API key (not echoed): ") if sys.stdin.isatty() else sys.stdin.read()
    print(hash_key(key))
    return 0
