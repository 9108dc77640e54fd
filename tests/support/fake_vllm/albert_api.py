"""Fake ``albert api ...`` for deploy tests: /health, /v1/models from the backends file, chat."""

import argparse
import json
import os
import sys

from fake_http import Handler, chat_answer, serve


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "api":
        print("fake albert: only `albert api` exists here", flush=True)
        sys.exit(2)
    parser = argparse.ArgumentParser(prog="albert api")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--backends", required=True)
    args, _ = parser.parse_known_args(argv[1:])
    with open(args.backends) as handle:
        backends = json.load(handle)
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
            body = self.body() or {}
            return self.send_json(200, chat_answer(body.get("model", "?"), body))

    serve(ApiHandler, args.host, args.port, "fake albert api")


if __name__ == "__main__":
    main()
