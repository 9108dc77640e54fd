"""The platform client against a real HTTP server on 127.0.0.1 that loads, then answers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pyalbert.client import Backoff, ClientError, PlatformClient, platform_headers

GOOD_TOKEN, FOLDER, NODE = "t0ken-good", "b1g-folder", "node-42"
FAST = Backoff(initial=0.02, factor=2, maximum=0.1, deadline=5)


class FakeNode(ThreadingHTTPServer):
    """Answers 503 for the first ``loading`` requests (as a node loading its model), then like vLLM
    behind a platform gateway: 401 without the right token, 403 for another folder."""

    daemon_threads = True

    def __init__(self, loading: int = 0, retry_after: str | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.loading, self.retry_after = loading, retry_after
        self.requests: list[tuple[str, dict]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeNode

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, body: dict | None) -> None:
        node = self.server
        node.requests.append((self.path, dict(self.headers)))
        if self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
            return self._send(401, {"message": "The token is invalid"})
        if self.headers.get("x-folder-id") != FOLDER:
            return self._send(403, {"message": "Permission denied"})
        if node.loading > 0:
            node.loading -= 1
            extra = {"Retry-After": node.retry_after} if node.retry_after else {}
            return self._send(503, {"message": "model is loading"}, extra)
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "albert-light"}]})
        if self.path == "/v1/chat/completions":
            if body["model"] != "albert-light":
                return self._send(404, {"object": "error", "type": "NotFoundError", "code": 404,
                                        "message": f"The model `{body['model']}` does not exist."})
            answer = f"echo: {body['messages'][-1]['content']}"
            return self._send(200, {"choices": [{"index": 0, "message": {
                "role": "assistant", "content": answer}}]})
        return self._send(404, {"detail": "Not Found"})

    def do_GET(self) -> None:
        self._handle(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self._handle(json.loads(self.rfile.read(length)))


@pytest.fixture
def node_factory() -> Iterator:
    servers = []

    def make(**kwargs) -> FakeNode:
        server = FakeNode(**kwargs)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def _client(url: str, token: str | None = GOOD_TOKEN, folder: str = FOLDER, **kwargs) -> PlatformClient:
    return PlatformClient(url, iam_token=token, folder_id=folder, node_id=NODE,
                          backoff=kwargs.pop("backoff", FAST), **kwargs)


def test_headers_only_those_set():
    assert platform_headers("tok", "f", "n") == {
        "Authorization": "Bearer tok", "x-folder-id": "f", "x-node-id": "n"}
    assert platform_headers(None, "f") == {"x-folder-id": "f"}


def test_waits_through_503_with_growing_delays_then_answers(node_factory):
    node = node_factory(loading=3)
    waits = []
    with _client(node.url, on_wait=lambda reason, delay, left: waits.append((reason, delay))) as c:
        assert c.chat_text("albert-light", "bonjour") == "echo: bonjour"
    assert waits == [("HTTP 503", 0.02), ("HTTP 503", 0.04), ("HTTP 503", 0.08)]
    assert len(node.requests) == 4
    path, headers = node.requests[-1]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {GOOD_TOKEN}"
    assert (headers["x-folder-id"], headers["x-node-id"]) == (FOLDER, NODE)


def test_retry_after_is_honoured_within_the_maximum(node_factory):
    node = node_factory(loading=2, retry_after="30")
    waits = []
    with _client(node.url, on_wait=lambda r, delay, left: waits.append(delay)) as c:
        assert c.models() == ["albert-light"]
    assert waits == [0.1, 0.1]  # capped by Backoff.maximum


def test_gives_up_at_the_deadline_with_a_clear_message(node_factory):
    node = node_factory(loading=10**6)
    started = time.monotonic()
    with _client(node.url, backoff=Backoff(initial=0.05, maximum=0.1, deadline=0.5)) as c, \
            pytest.raises(ClientError) as err:
        c.models()
    assert 0.5 <= time.monotonic() - started < 2
    assert err.value.status == 503
    assert "still answers HTTP 503 after 0.5s" in str(err.value)
    assert "node's logs" in str(err.value)


def test_refused_connection_is_retried_until_the_deadline():
    with _client("http://127.0.0.1:9", backoff=Backoff(initial=0.05, deadline=0.2)) as c, \
            pytest.raises(ClientError, match="cannot connect"):
        c.models()


@pytest.mark.parametrize(
    ("token", "expected"),
    [("expired", "token in $IAM_TOKEN is invalid or expired"), (None, "$IAM_TOKEN is unset")],
    ids=["bad-token", "no-token"],
)
def test_401_says_which_token_problem_and_the_fix(node_factory, token, expected):
    node = node_factory()
    with _client(node.url, token=token) as c, pytest.raises(ClientError) as err:
        c.chat("albert-light", "hi")
    assert err.value.status == 401
    assert expected in str(err.value)
    assert "The token is invalid" in str(err.value)
    assert "export it as IAM_TOKEN" in str(err.value)
    assert len(node.requests) == 1  # never retried


def test_403_names_folder_and_node(node_factory):
    node = node_factory()
    with _client(node.url, folder="other-folder") as c, pytest.raises(ClientError) as err:
        c.models()
    assert err.value.status == 403
    assert "folder other-folder, node node-42" in str(err.value)


def test_404_for_an_unknown_model_and_for_a_wrong_url(node_factory):
    node = node_factory()
    with _client(node.url) as c, pytest.raises(ClientError) as err:
        c.chat("AgentPublic/albertlight-7b", "hi")
    assert "model 'AgentPublic/albertlight-7b' is not served there" in str(err.value)
    with _client(node.url + "/nope") as c, pytest.raises(ClientError) as err:
        c.models()
    assert "404 Not Found" in str(err.value) and "base URL" in str(err.value)


def test_base_url_may_end_with_v1(node_factory):
    node = node_factory()
    with _client(node.url + "/v1/") as c:
        assert c.models() == ["albert-light"]


def test_cli_chat_reads_the_token_from_the_environment_and_says_it_waits(node_factory, monkeypatch, capsys):
    from pyalbert.cli import main

    node = node_factory(loading=1, retry_after="0")
    monkeypatch.setenv("IAM_TOKEN", GOOD_TOKEN)
    monkeypatch.setenv("FOLDER_ID", FOLDER)
    code = main(["client", "chat", "--url", node.url, "--model", "albert-light", "--node-id", NODE,
                 "ping"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "echo: ping\n"
    assert "waiting:" in err and "HTTP 503" in err
    assert GOOD_TOKEN not in out + err


def test_cli_bad_token_is_one_paragraph_and_exit_1(node_factory, monkeypatch, capsys):
    from pyalbert.cli import main

    node = node_factory()
    monkeypatch.setenv("IAM_TOKEN", "wrong")
    code = main(["client", "models", "--url", node.url, "--folder-id", FOLDER])
    assert code == 1
    err = capsys.readouterr().err
    assert "401 Unauthorized" in err and "Traceback" not in err


def test_readme_openai_and_langchain_examples_send_the_platform_headers(node_factory):
    from langchain_openai import ChatOpenAI
    from openai import OpenAI

    node = node_factory()
    headers = {"x-folder-id": FOLDER, "x-node-id": NODE}
    client = OpenAI(base_url=f"{node.url}/v1", api_key=GOOD_TOKEN, default_headers=headers,
                    max_retries=0)
    answer = client.chat.completions.create(model="albert-light",
                                            messages=[{"role": "user", "content": "Bonjour"}])
    assert answer.choices[0].message.content == "echo: Bonjour"
    llm = ChatOpenAI(model="albert-light", base_url=f"{node.url}/v1", api_key=GOOD_TOKEN,
                     default_headers=headers, max_retries=0)
    assert llm.invoke("Salut").content == "echo: Salut"
    for _, raw in node.requests:
        sent = {k.lower(): v for k, v in raw.items()}
        assert sent["authorization"] == f"Bearer {GOOD_TOKEN}"
        assert (sent["x-folder-id"], sent["x-node-id"]) == (FOLDER, NODE)
