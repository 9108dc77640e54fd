"""``albert hub serve``: a folder of models served with the hub's HTTP API (set ``HF_ENDPOINT``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pyalbert.errors import AlbertError


def register(sub: argparse._SubParsersAction) -> None:
    hub = sub.add_parser("hub", help="model hub tools for air-gapped hosts")
    actions = hub.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve", help="serve ROOT/<org>/<name> folders as hub repos (point HF_ENDPOINT at it)")
    serve.add_argument("--root", type=Path, required=True, help="folder of model directories")
    serve.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=SUBDIR",
                       help="serve ROOT/SUBDIR as repo ORG/NAME (repeatable; adds to ROOT/<org>/<name>)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8090, help="port (default: 8090; 0 picks a free one)")
    serve.add_argument("--token-env", metavar="VAR", default=None,
                       help="require 'Authorization: Bearer $VAR' (clients set HF_TOKEN to the same value)")
    serve.add_argument("--max-connections", type=int, default=None, metavar="N",
                       help="connections served at once, one thread each; more get 503 + Retry-After "
                            "(default: 64)")
    serve.add_argument("--quiet", action="store_true", help="no access log")
    serve.set_defaults(func=serve_cmd)


def serve_cmd(args: argparse.Namespace) -> int:
    from pyalbert.hub.mirror.folders import MirrorError, parse_repo_mapping
    from pyalbert.hub.mirror.server import server_url
    from pyalbert.hub.mirror.service import Mirror
    from pyalbert.hub.progress import human_bytes

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env, "").strip()
        if not token:
            raise MirrorError(f"--token-env {args.token_env}: the variable is not set or empty. Fix: "
                              f"export {args.token_env}=<a long random string> (clients send it as "
                              "HF_TOKEN), or drop --token-env to serve without a token.")
    repos = dict(parse_repo_mapping(text) for text in args.repo)
    mirror = Mirror(args.root, repos, token=token)
    started = time.perf_counter()
    snaps = mirror.index()
    for snap in snaps:
        _say(f"{snap.repo_id}  commit {snap.commit[:12]}  {len(snap.files)} files, "
             f"{human_bytes(snap.total_bytes)}  ({snap.folder})")
    _say(f"hashed {mirror.hashed_files} file(s), {human_bytes(mirror.hashed_bytes)} in "
         f"{time.perf_counter() - started:.1f} s; the rest from {mirror.cache.path}")
    if mirror.cache.save_error:
        _say(f"warning: cannot write the digest cache ({mirror.cache.save_error}); the next start rehashes")
    try:
        limits = {} if args.max_connections is None else {"max_connections": args.max_connections}
        server = mirror.make_server(args.host, args.port, **limits)
    except OSError as exc:
        raise AlbertError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}). Fix: pick "
                          "another --port, or stop what uses it.") from None
    if not args.quiet:
        mirror.log = lambda line: print(line, file=sys.stderr, flush=True)
    url = server_url(server)
    _say(f"serving {len(snaps)} repo(s) on {url}{' (token required)' if token else ''}; "
         f"clients: export HF_ENDPOINT={url}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        _say("stopped")
    finally:
        server.server_close()
    return 0


def _say(line: str) -> None:
    print(line, flush=True)
