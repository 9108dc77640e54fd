"""Fake ``albert api ...`` for deploy tests: /health, /v1/models from the backends file, chat
relayed to the model's replica with ``--upstream-key`` (the servers' key) as the gateway does."""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

from fake_http import Handler, serve


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "api":
        print("fake albert: only `albert api` exists here", flush=True)
        sys.exit(2)
    parser = argparse.ArgumentParser(prog="albert api")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--uds", default=None)
    parser.add_argument("--backends", required=True)
    parser.add_argument("--upstream-key", default=None)
    parser.add_argument("--routes", default=None)
    args, _ = parser.parse_known_args(argv[1:])
    with open(args.backends) as handle:
        backends = json.load(handle)
    key = None
    if args.upstream_key:
        with open(args.upstream_key) as handle:
            key = handle.read().strip()
    version = os.environ.get("FAKE_API_VERSION", "")

    class ApiHandler(Handler):
        def do_GET(self):
            if self.path == "/health":
                return self.send_json(200, {"status": "ok", "version": version})
            if self.path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [
                    {"id": m, "object": "model"} for m in backends]})
            return self.send_json(404, {"error": "not found"})

        def do_POST(self):
            """Relay to the model's first replica that answers, with the servers' key, as the
            gateway does (where the routes folder moved it: a replica on its spare port; a replica
            out of rotation is skipped, none left: 503; none reachable: 502)."""
            body = self.body() or {}
            urls = backends.get(body.get("model"))
            if not urls:
                return self.send_json(404, {"error": f"model {body.get('model')!r} not found"})
            moved = routes(args.routes, body.get("model"))
            urls = [u for u in (moved.get(u.rstrip("/"), u) for u in urls) if u]
            if not urls:
                return self.send_json(503, {"error": "every replica is out of rotation"})
            errors = []
            for url in urls:
                request = urllib.request.Request(
                    url + self.path, data=json.dumps(body).encode(), method="POST",
                    headers={"Content-Type": "application/json",
                             **({"Authorization": f"Bearer {key}"} if key else {})})
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        return self.send_json(answer.status, json.loads(answer.read()))
                except urllib.error.HTTPError as exc:
                    return self.send_json(exc.code, json.loads(exc.read() or b"{}"))
                except OSError as exc:
                    errors.append(f"{url}: {exc}")
            return self.send_json(502, {"error": f"upstream: {'; '.join(errors)}"})

    serve(ApiHandler, args.host, args.port, "fake albert api", uds=args.uds)


def routes(folder, model) -> dict:
    """The routes folder's moves of ``model``'s replicas: base URL -> URL now (None: out)."""
    out = {}
    for name in sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else ():
        try:
            with open(os.path.join(folder, name)) as handle:
                route = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(route, dict) and route.get("model") == model and route.get("base"):
            out[route["base"].rstrip("/")] = (route.get("url") or "").rstrip("/") or None
    return out


if __name__ == "__main__":
    main()
