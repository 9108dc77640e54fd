"""The official openai client and LangChain's ChatOpenAI against the gateway."""

from __future__ import annotations

import io
import time

import openai
import pytest
from langchain_openai import ChatOpenAI

from pyalbert.api.answers import Answers
from pyalbert.api.app import Gateway
from pyalbert.api.keys import hash_key
from pyalbert.api.settings import GatewaySettings
from pyalbert.whitelist import matcher
from tests.support.fake_upstream import FakeUpstream, GatewayServer

KEY = "k-clients-0123456789abcdef"
WL = matcher.Whitelist.from_entries(domains=["gouv.fr"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(f'[{{"name": "c", "sha256": "{hash_key(KEY)}"}}]')
    with FakeUpstream() as fake:
        settings = GatewaySettings(backends={"m": [fake.url]}, keys_path=str(keys))
        app = Gateway(settings, answers=Answers("flag", WL, matcher), log_stream=io.BytesIO())
        with GatewayServer(app) as server:
            yield fake, server


@pytest.fixture
def fake(setup):
    setup[0].reset()
    return setup[0]


@pytest.fixture
def client(setup):
    return openai.OpenAI(base_url=setup[1].url + "/v1", api_key=KEY, max_retries=0)


def test_openai_plain_and_flag_field(client, fake):
    fake.reply = "Voir https://www.gouv.fr et https://x.example/a pour plus."
    resp = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}])
    assert resp.headers["x-albert-whitelist"] == "flag; entries=1"
    completion = resp.parse()
    assert completion.choices[0].message.content == fake.reply
    assert completion.model_extra["albert"] == {"unverified": [{"kind": "url", "text": "https://x.example/a"}]}
    assert completion.usage.total_tokens == 12


def test_openai_stream(client, fake):
    stream = client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "worda wordb wordc wordd worde "


def test_openai_models_and_embeddings(client, fake):
    deadline = time.monotonic() + 5
    while not client.models.list().data:  # until the probe found the replica healthy
        assert time.monotonic() < deadline
        time.sleep(0.02)
    models = client.models.list().data
    assert [m.id for m in models] == ["m"]
    emb = client.embeddings.create(model="m", input=["a", "b"])
    assert len(emb.data) == 2


def test_openai_errors(setup, client, fake):
    bad = openai.OpenAI(base_url=setup[1].url + "/v1", api_key="wrong-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError, match="available models: m"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    fake.close_after = 3
    with pytest.raises(openai.APIError, match="interrupted"):
        for _ in client.chat.completions.create(model="m", stream=True,
                                                messages=[{"role": "user", "content": "x"}]):
            pass
    fake.close_after = None
    # still serving
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


def test_langchain_chat_openai(setup, fake):
    llm = ChatOpenAI(base_url=setup[1].url + "/v1", api_key=KEY, model="m", max_retries=0)
    assert llm.invoke("hello").content == "worda wordb wordc wordd worde "
    assert "".join(chunk.content for chunk in llm.stream("hello")) == "worda wordb wordc wordd worde "
    bad = ChatOpenAI(base_url=setup[1].url + "/v1", api_key=KEY, model="nope", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        bad.invoke("hello")
