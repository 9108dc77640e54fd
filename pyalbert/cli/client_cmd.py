"""``albert client chat|models --url URL``: call a node or the gateway with the platform's headers.

The IAM token comes from ``$IAM_TOKEN`` only (argv is visible to every user in ``ps``).
"""

from __future__ import annotations

import argparse
import json
import sys

from pyalbert.ui import console_err


def register(sub: argparse._SubParsersAction) -> None:
    client = sub.add_parser("client", help="call an OpenAI-compatible node ($IAM_TOKEN, waits on 503)")
    actions = client.add_subparsers(dest="action", metavar="ACTION", required=True)

    chat = actions.add_parser("chat", help="one chat completion; prints the answer")
    _common(chat)
    chat.add_argument("--model", "-m", required=True, help="served model id")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--json", action="store_true", help="print the whole JSON answer")
    chat.add_argument("prompt", help="the user message")
    chat.set_defaults(func=chat_command)

    models = actions.add_parser("models", help="list the served model ids (GET /v1/models)")
    _common(models)
    models.set_defaults(func=models_command)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="base URL of the node or gateway")
    parser.add_argument("--folder-id", help="x-folder-id header (default: $FOLDER_ID)")
    parser.add_argument("--node-id", help="x-node-id header (default: $NODE_ID)")
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="seconds to wait through 503 while the model loads (default 600)")


def _client(args: argparse.Namespace):
    from pyalbert.client import Backoff, PlatformClient

    def on_wait(reason: str, delay: float, remaining: float) -> None:
        console_err.print(f"waiting: {args.url} answers {reason} (model loading?), retry in "
                          f"{delay:.1f}s, {remaining:.0f}s left", highlight=False)

    return PlatformClient.from_env(args.url, folder_id=args.folder_id, node_id=args.node_id,
                                   backoff=Backoff(deadline=args.deadline), on_wait=on_wait)


def chat_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.json:
            sys.stdout.write(json.dumps(client.chat(args.model, args.prompt, system=args.system,
                                                    **params), indent=2) + "\n")
        else:
            sys.stdout.write(client.chat_text(args.model, args.prompt, system=args.system,
                                              **params) + "\n")
    return 0


def models_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for model_id in client.models():
            sys.stdout.write(model_id + "\n")
    return 0
