"""Fake ``python -m vllm.entrypoints.openai.api_server`` (see tests/support/fake_vllm)."""

import argparse
import json
import os
import sys
import threading
import time

import fake_ray
from fake_http import Handler, chat_answer, serve

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{name}"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{name}"}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{name}"}} 0.0
"""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fake-vllm")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--api-key", action="append", default=None)
    args, rest = parser.parse_known_args(argv)
    # as vLLM (serve/middleware/register.py): --api-key wins over $VLLM_API_KEY; /v1/* needs one
    # of them as a Bearer token, else 401 {"error": "Unauthorized"}; /health and /metrics are open
    tokens = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY")]) if k]
    name = args.served_model_name or args.model
    delay = float(os.environ.get("FAKE_VLLM_START_DELAY", "0"))
    fail = os.environ.get("FAKE_VLLM_FAIL", "")
    print(f"fake vllm: model {args.model} as {name}, extra args {rest}", flush=True)
    if fail == "exit":
        print("fake vllm: ValueError: failed to load the model (FAKE_VLLM_FAIL=exit)", flush=True)
        sys.exit(1)
    if os.environ.get("FAKE_VLLM_REQUIRE_MODEL_DIR") == "1" and not os.path.isdir(args.model):
        print(f"fake vllm: model directory {args.model} does not exist", flush=True)
        sys.exit(1)
    cache = os.environ.get("VLLM_CACHE_ROOT")
    if cache:  # as vLLM's torch.compile: artefacts under $VLLM_CACHE_ROOT/torch_compile_cache
        compiled = os.path.join(cache, "torch_compile_cache", "fake")
        warm = os.path.isdir(compiled) and bool(os.listdir(compiled))
        print(f"fake vllm: compile cache {cache} {'warm' if warm else 'cold'}", flush=True)
        os.makedirs(compiled, exist_ok=True)
        with open(os.path.join(compiled, f"{name}.graph"), "w") as out:
            out.write("compiled\n" * 512)
    if fake_ray.enabled():  # vLLM's Ray executor: listens once its workers are placed and loaded
        fake_ray.RayEngine(fake_ray.world_size(rest)).start()
        time.sleep(delay)
        delay = 0
    ready_at = time.monotonic() + delay
    # FAKE_VLLM_TOKEN_DELAY: seconds between streamed chunks (and before a plain answer), so that
    # requests are in flight when a deploy drains the server; /metrics counts them as vLLM does
    token_delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY", "0"))
    running = [0]
    lock = threading.Lock()

    class VllmHandler(Handler):
        def ready(self):
            return fail != "never-ready" and time.monotonic() >= ready_at

        def refused(self):
            if not tokens or not self.path.startswith(("/v1", "/v2", "/inference", "/cohere")):
                return False
            scheme, _, param = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() == "bearer" and param in tokens:
                return False
            self.send_json(401, {"error": "Unauthorized"})
            return True

        def do_GET(self):
            if self.refused():
                return None
            if not self.ready():
                return self.send_json(503, {"error": "loading"})
            if self.path == "/health":
                return self.send_json(200, {})
            if self.path == "/metrics":  # a few of vLLM 0.32's own series, in its text format
                return self.send_text(200, METRICS.format(name=name, running=running[0], waiting=0))
            if self.path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "owned_by": "vllm", "root": args.model}]})
            return self.send_json(404, {"error": "not found"})

        def do_POST(self):
            body = self.body()
            if self.refused():
                return None
            if not self.ready():
                return self.send_json(503, {"error": "loading"})
            if body is None:
                return self.send_json(400, {"error": "malformed JSON"})
            if self.path == "/v1/chat/completions":
                if body.get("model") != name:
                    return self.send_json(404, {"error": {"message": f"model {body.get('model')} "
                                                          "does not exist", "code": 404}})
                with lock:
                    running[0] += 1
                try:
                    if body.get("stream"):
                        return self.stream(chat_answer(name, body))
                    time.sleep(token_delay * 4)
                    return self.send_json(200, chat_answer(name, body))
                finally:
                    with lock:
                        running[0] -= 1
            return self.send_json(404, {"error": "not found"})

        def stream(self, answer):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            words = answer["choices"][0]["message"]["content"].split(" ")
            head = {"id": answer["id"], "object": "chat.completion.chunk",
                    "created": answer["created"], "model": answer["model"]}
            events = [{**head, "choices": [{"index": 0, "delta": {"content": w + " "},
                                            "finish_reason": None}]} for w in words]
            events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            for i, event in enumerate(events):
                data = f"data: {json.dumps(event)}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                if i < len(events) - 1:
                    time.sleep(token_delay)
            done = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            self.wfile.flush()
            return None

    serve(VllmHandler, args.host, args.port, "fake vllm")


if __name__ == "__main__":
    main()
