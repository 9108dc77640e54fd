"""A local model hub for tests: the endpoints huggingface_hub (2.x) calls, on 127.0.0.1.

Implements what ``model_info(files_metadata=True)``, ``snapshot_download(local_dir=...)`` and
``hf_hub_download`` request (checked against the installed client):

- ``GET /api/models/{repo}/revision/{rev}[?blobs=true]``: sha + siblings (size, blobId, lfs)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: the file listing
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1, or the
  sha256 for LFS files with ``X-Linked-Etag``/``X-Linked-Size``), ``Range`` -> 206
- errors with the hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo)

Faults for tests: cut a transfer once midway, serve corrupted bytes, answer a status to a file's
GET, throttle bodies. Every request is recorded (method, path, Range, token, start/end time).

The protocol itself (routes, headers, JSON bodies, ranges) is the product's, from
``pyalbert.hub.mirror`` (``albert hub serve``): one implementation of what the client expects.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from pyalbert.hub.mirror import protocol
from pyalbert.hub.mirror.protocol import LFS_SUFFIXES, git_blob_sha1  # noqa: F401 - re-exported for tests


def is_lfs(path: str, data: bytes) -> bool:
    return protocol.is_lfs(path, len(data))


@dataclass(frozen=True)
class HubFile:
    data: bytes
    lfs: bool

    @cached_property
    def meta(self) -> protocol.FileMeta:
        """What the hub announces: size, blob id (of the pointer for LFS files), sha256."""
        if self.lfs:
            return protocol.FileMeta.of(len(self.data), lfs=True, sha256=self.sha256)
        return protocol.FileMeta.of(len(self.data), lfs=False, blob_id=git_blob_sha1(self.data))

    @property
    def blob_id(self) -> str:
        return self.meta.blob_id

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.meta.etag


@dataclass
class HubRepo:
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated_tokens: set[str] | None = None  # None: public; else the tokens granted access
    private: bool = False

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    token: str | None
    started: float
    ended: float
    status: int
    body_bytes: int


class HubServer:
    """``with HubServer() as hub: hub.add_commit("org/tiny", files)``; ``hub.url`` is HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self._requests: list[Request] = []
        self.cut_once: dict[str, float] = {}  # path -> fraction sent before the connection drops
        self.corrupt: set[str] = set()  # paths served with one byte flipped
        self.fail_get: dict[str, int] = {}  # path -> HTTP status answered to its GET
        self.throttle_bps: int | None = None
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        repo = self.repos.setdefault(repo_id, HubRepo())
        parent = repo.refs.get(branch, "")
        digest = hashlib.sha1(parent.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        commit = digest.hexdigest()
        repo.commits[commit] = {p: HubFile(d, is_lfs(p, d)) for p, d in files.items()}
        repo.refs[branch] = commit
        return commit

    def gate(self, repo_id: str, tokens: set[str]) -> None:
        self.repos[repo_id].gated_tokens = set(tokens)

    # -- requests ------------------------------------------------------------------------------
    def _settle(self, timeout: float = 5.0) -> None:
        """Wait for answers in progress: a client may have read the last byte before the handler
        thread records the request."""
        deadline = time.monotonic() + timeout
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.005)

    @property
    def requests(self) -> list[Request]:
        """Every request answered so far (after those in progress finish)."""
        self._settle()
        with self._lock:
            return list(self._requests)

    def in_flight(self) -> list[str]:
        """Paths of requests being answered right now."""
        with self._lock:
            return sorted(p for p, n in self._in_flight.items() if n)

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def downloads(self) -> list[Request]:
        """GETs of file contents (not HEADs, not API calls)."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    def downloaded_files(self) -> list[str]:
        return sorted({r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.downloads()})

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(_HubHandler):
            server_hub = hub

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a killed client is expected
            super().handle_error(request, client_address)


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_GET(self) -> None:
        self._handle("GET")

    # -- plumbing --------------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        started = time.monotonic()
        self._status, self._sent = 0, 0
        url = urlsplit(self.path)
        path = url.path
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() or None
        hub = self.server_hub
        with hub._lock:
            hub._in_flight[unquote(path)] = hub._in_flight.get(unquote(path), 0) + 1
        try:
            self._route(method, path, parse_qs(url.query), token)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            request = Request(method, unquote(path), self.headers.get("Range"), token, started,
                              time.monotonic(), self._status, self._sent)
            with hub._lock:  # recorded before it stops counting as in flight
                hub._requests.append(request)
                hub._in_flight[unquote(path)] -= 1

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, head: bool = False) -> None:
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
            self._sent = len(body)

    def _json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"Content-Type": "application/json", **(headers or {})},
                   json.dumps(data).encode())

    def _error(self, status: int, code: str, message: str, commit: str | None = None,
               head: bool = False) -> None:
        self._send(status, protocol.error_headers(code, message, commit), protocol.error_body(message),
                   head=head)

    # -- routes -----------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, token: str | None) -> None:
        hub = self.server_hub
        route = protocol.match_route(path)
        if route is None:
            return self._error(404, "NotFound", "no such endpoint", head=method == "HEAD")
        repo_id, rev = route.repo, route.revision
        repo = hub.repos.get(repo_id)
        head = method == "HEAD"
        if repo is None or (repo.private and (repo.gated_tokens is None or token not in repo.gated_tokens)):
            return self._error(404, "RepoNotFound", "Repository not found", head=head)
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        files = repo.commits[commit]
        if route.kind == "info":
            return self._json(200, protocol.model_info(
                repo_id, commit, {p: f.meta for p, f in files.items()}, blobs="blobs" in query,
                private=repo.private, gated=repo.gated_tokens is not None))
        if route.kind == "tree":
            return self._json(200, protocol.tree({p: f.meta for p, f in files.items()}, route.path))
        file_path = route.path
        if repo.gated_tokens is not None and token not in repo.gated_tokens:
            status = 401 if token is None else 403
            return self._error(status, "GatedRepo", "Access to model is restricted", commit, head=head)
        if method == "GET" and file_path in hub.fail_get:
            return self._error(hub.fail_get[file_path], "Failure", "injected failure", commit)
        entry = files.get(file_path)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{file_path} does not exist", commit, head=head)
        self._resolve(method, file_path, commit, entry)

    def _resolve(self, method: str, file_path: str, commit: str, entry: HubFile) -> None:
        hub = self.server_hub
        data = entry.data
        if file_path in hub.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = protocol.file_headers(commit, entry.meta)
        if method == "HEAD":
            self._status = 200
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        status = 200
        try:
            wanted = protocol.byte_range(self.headers.get("Range"), len(data))
        except protocol.RangeNotSatisfiable:
            return self._send(416, {**headers, "Content-Range": f"bytes */{len(data)}"})
        if wanted is not None:
            start, end = wanted
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with hub._lock:
            cut = hub.cut_once.pop(file_path, None)
        limit = int(len(data) * cut) if cut is not None else len(data)
        self._write_body(data[:limit])
        if cut is not None:  # drop the connection midway: the client sees a short body
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)

    def _write_body(self, data: bytes) -> None:
        bps = self.server_hub.throttle_bps
        chunk = 256 * 1024 if bps is None else max(4096, bps // 20)
        view = memoryview(data)
        for offset in range(0, len(view), chunk):
            piece = view[offset:offset + chunk]
            self.wfile.write(piece)
            self._sent += len(piece)
            if bps:
                time.sleep(len(piece) / bps)


# -- a tiny Llama-style model -------------------------------------------------------------------

def safetensors_bytes(tensors: dict[str, tuple[int, ...]], seed: int) -> bytes:
    """A float32 safetensors file (header + data) with small finite values."""
    rng = random.Random(seed)
    block = struct.pack("<1024f", *(rng.uniform(-0.02, 0.02) for _ in range(1024)))
    header, offset, sizes = {}, 0, []
    for name, shape in tensors.items():
        n = 1
        for dim in shape:
            n *= dim
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
        sizes.append(4 * n)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    body = (block * (offset // len(block) + 1))[:offset]
    return struct.pack("<Q", len(head)) + head + body


def _byte_level_tokenizer() -> dict:
    """A byte-level BPE tokenizer.json with the 256 byte tokens and no merges (+ <s>, </s>)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {"<s>": 0, "</s>": 1}
    for i, c in enumerate(sorted(zip(bs, cs, strict=True))):
        vocab[chr(c[1])] = i + 2
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True},
            {"id": 1, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True},
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": []},
    }


def tiny_llama_files(*, layers: int = 4, hidden: int = 128, seed: int = 0,
                     with_skipped: bool = True, shards: int = 1) -> dict[str, bytes]:
    """A loadable Llama repo: config (head size 64), tokenizer, safetensors weights (~3 MB at
    the defaults), plus files vLLM never reads (which the download must skip)."""
    vocab, inter, heads, kv_heads = 258, 2 * hidden, hidden // 64, max(1, hidden // 128)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": 64, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 0, "eos_token_id": 1,
    }
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": (heads * 64, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * 64, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * 64, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * 64),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    tensors |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    files: dict[str, bytes] = {
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 1}).encode(),
        "tokenizer.json": json.dumps(_byte_level_tokenizer()).encode(),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "model_max_length": 2048,
            "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant: {% endif %}",
        }).encode(),
        "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}).encode(),
        "README.md": f"# tiny llama (seed {seed})\n".encode(),
    }
    names = list(tensors)
    if shards == 1:
        files["model.safetensors"] = safetensors_bytes(tensors, seed)
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            files[fname] = safetensors_bytes(part, seed + s)
            weight_map |= dict.fromkeys(part, fname)
        files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    if with_skipped:
        rng = random.Random(seed + 1000)
        files |= {
            ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
            "original/consolidated.00.pth": rng.randbytes(200_000),
            "pytorch_model.bin": rng.randbytes(150_000),
            "flax_model.msgpack": rng.randbytes(100_000),
            "tf_model.h5": rng.randbytes(100_000),
            "onnx/model.onnx": rng.randbytes(50_000),
            "model-q4.gguf": rng.randbytes(80_000),
        }
    return files


#: files of tiny_llama_files() that a vLLM download keeps
TINY_LLAMA_KEPT = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "README.md", "model.safetensors",
}


def serve_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """Body of a ``hub`` fixture: a started local hub; HF_ENDPOINT points at it, HF_HOME is a
    temp dir, no token, online. Stopped at teardown, even on failure."""
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield server
    finally:
        server.stop()
