"""Shared by the fake vLLM server and the fake api: a threaded HTTP server that drains on SIGTERM."""

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for in-flight requests
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn_lock = threading.Lock()
        self.idle: dict = {}  # connection -> waiting for its next request (keep-alive)
        self.draining = False

    def close_idle(self):
        """Like uvicorn on SIGTERM: idle keep-alive connections close, busy ones finish first."""
        with self.conn_lock:
            self.draining = True
            for conn, idle in self.idle.items():
                if idle:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)


class UnixServer(Server):
    """The same server on a unix socket (the gateway's ``--uds``: the front door's way in)."""

    address_family = socket.AF_UNIX

    def server_bind(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.server_address)  # a stale socket of a stopped gateway
        self.socket.bind(self.server_address)
        os.chmod(self.server_address, 0o600)
        self.server_name, self.server_port = "localhost", 0


def serve(handler, host, port, name, uds=None):
    servers = [Server((host, port), handler), *([UnixServer(uds, handler)] if uds else [])]

    def stop(signum, frame):
        print(f"{name}: SIGTERM, draining", flush=True)
        for server in servers:
            server.close_idle()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{name}: listening on {host}:{port}" + (f" and {uds}" if uds else ""), flush=True)
    others = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}) for s in servers[1:]]
    for thread in others:
        thread.start()
    servers[0].serve_forever(poll_interval=0.1)
    for thread in others:
        thread.join()
    for server in servers:
        server.server_close()
    print(f"{name}: stopped", flush=True)
    sys.exit(0)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.conn_lock:
            self.server.idle[self.connection] = True

    def finish(self):
        with self.server.conn_lock:
            self.server.idle.pop(self.connection, None)
        super().finish()

    def parse_request(self):
        with self.server.conn_lock:
            self.server.idle[self.connection] = False
            if self.server.draining:
                self.close_connection = True
        return super().parse_request()

    def handle_one_request(self):
        super().handle_one_request()
        with self.server.conn_lock:
            if self.server.draining:
                self.close_connection = True
            self.server.idle[self.connection] = True

    def send_json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_text(self, code, text, content_type="text/plain; version=0.0.4; charset=utf-8"):
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return None


def chat_answer(model, body):
    text = "fake answer"
    messages = body.get("messages") or []
    if messages and isinstance(messages[-1], dict):
        text = f"echo: {str(messages[-1].get('content', ''))[:200]}"
    delay = float(body.get("fake_delay_s", 0) or 0)
    if delay:
        time.sleep(min(delay, 30))
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
