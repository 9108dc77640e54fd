"""Keys file, hashing, token buckets, settings and the `albert api` command line."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.api import admission
from pyalbert.api.errors import ApiError
from pyalbert.api.keys import Bucket, Key, KeySpec, KeyStore, hash_key
from pyalbert.api.settings import GatewaySettings, parse_backends, settings_from_spec
from pyalbert.cli import main
from pyalbert.config import load_spec
from pyalbert.errors import AlbertError
from tests.conftest import ONE_GPU_HOST, REPO
from tests.support.fake_upstream import FakeUpstream

KEY = "k-0123456789abcdef-xyz"


def test_hash_key_is_sha256_of_the_stripped_key():
    assert hash_key(KEY + "\n") == hashlib.sha256(KEY.encode()).hexdigest()
    with pytest.raises(AlbertError, match="at least 16"):
        hash_key("short")


def test_cli_hash_key_reads_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", type("S", (), {"isatty": lambda s: False, "read": lambda s: KEY + "\n"})())
    assert main(["api", "hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(KEY)


def test_keys_file_yaml_and_lookup(tmp_path: Path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - name: a\n    sha256: {hash_key(KEY).upper()}\n    models: m1\n"
                    "    requests_per_minute: 60\n")
    store = KeyStore.load(path, workers=2)
    key = store.lookup(KEY.encode())
    assert key.name == "a" and key.allows("m1") and not key.allows("m2")
    assert key.requests.capacity == 30  # per worker
    assert store.lookup(b"other") is None


@pytest.mark.parametrize(("text", "message"), [
    ("keys: [", "not valid JSON/YAML"),
    ("keys:\n  - name: a\n    sha256: abc\n", "'keys.0.sha256': must be 64 hexadecimal"),
    ("keys:\n  - name: a\n    sha256: " + "a" * 64 + "\n    rpm: 3\n", "keys.0.rpm"),
    ("keys:\n  - {name: a, sha256: " + "a" * 64 + "}\n  - {name: a, sha256: " + "b" * 64 + "}\n",
     "appears twice"),
], ids=["syntax", "bad-hash", "unknown-field", "duplicate"])
def test_keys_file_errors_name_the_file_and_the_fix(tmp_path: Path, text, message):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(AlbertError, match=message) as exc:
        KeyStore.load(path)
    assert str(path) in str(exc.value) and "Fix" in str(exc.value)


def test_missing_keys_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(AlbertError, match="cannot be read.*ALBERT_API_KEYS"):
        KeyStore.load(tmp_path / "nope.json")


def test_bucket_refills_over_time():
    bucket = Bucket(60)  # one per second
    now = bucket.stamp
    bucket.take(60, now)
    assert bucket.wait_time(1, now) == pytest.approx(1.0)
    assert bucket.wait_time(1, now + 1.0) == 0
    bucket.take(100, now + 1.0)  # a debt (tokens reported after the answer)
    assert bucket.wait_time(1, now + 1.0) == pytest.approx(100.0)


def test_key_admit_counts_requests_and_tokens():
    key = Key(KeySpec(name="k", sha256="a" * 64, requests_per_minute=2, tokens_per_minute=100))
    assert key.admit() == (0.0, "")
    key.settle(1, 151)  # used more than reserved: a debt
    wait, which = key.admit()
    assert which == "tokens per minute" and wait > 20


def test_reservations_are_taken_at_admission_and_settled():
    key = Key(KeySpec(name="k", sha256="a" * 64, tokens_per_minute=100))
    assert key.admit(40) == (0.0, "")
    assert key.admit(40) == (0.0, "")
    wait, which = key.admit(40)  # 20 left: concurrent requests cannot all pass
    assert which == "tokens per minute" and wait > 0
    key.settle(40, 5)  # the first used 5: 35 given back
    assert key.admit(40) == (0.0, "")
    # a request that may use more than the whole budget needs a full bucket, not more
    fresh = Key(KeySpec(name="f", sha256="b" * 64, tokens_per_minute=100))
    assert fresh.admit(10_000) == (0.0, "")
    fresh.settle(10_000, 10)
    assert fresh.tokens.level == pytest.approx(90, abs=1)
    fresh.settle(0, -1000)  # giving back never fills past the capacity
    assert fresh.tokens.level <= fresh.tokens.capacity


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), (5, 5), (5.0, 5), (1e5, 100000),
], ids=["absent", "int", "float", "exponent"])
def test_counts_accept_integers_in_any_json_spelling(value, expected):
    assert admission.count({} if value is None else {"n": value}, "n") == expected


@pytest.mark.parametrize("value", ["5", True, False, 1.5, 0, -1, [], {}, float("inf")],
                         ids=["string", "true", "false", "fraction", "zero", "negative", "list",
                              "object", "infinite"])
def test_counts_refuse_anything_else_with_a_400_naming_the_field(value):
    with pytest.raises(ApiError) as info:
        admission.count({"max_tokens": value}, "max_tokens")
    assert info.value.status == 400 and info.value.param == "max_tokens"


def test_caps_lower_fill_and_canonicalise():
    req = {"max_tokens": 1e4, "n": 9.0, "best_of": 2}
    assert admission.apply_caps(req, token_cap=100, n_cap=4)
    assert req == {"max_tokens": 100, "n": 4, "best_of": 2}
    req = {"max_completion_tokens": 50}
    assert not admission.apply_caps(req, token_cap=100, n_cap=4)  # already within the caps
    assert "max_tokens" not in req
    req = {}
    assert admission.apply_caps(req, token_cap=100, n_cap=None) and req == {"max_tokens": 100}
    req = {"max_tokens": 7.0}
    assert admission.apply_caps(req, None, None) and type(req["max_tokens"]) is int


def test_reservation_covers_prompt_and_every_choice():
    body = 400
    one = admission.reservation({"max_tokens": 100}, body, "chat")
    assert one >= 100 + body // admission.PROMPT_BYTES_PER_TOKEN
    assert admission.reservation({"max_tokens": 100, "n": 3}, body, "chat") - one == 200
    assert admission.reservation({}, body, "chat", model_len=2048) > 2048
    assert admission.reservation({}, body, "chat") > admission.DEFAULT_MODEL_LEN
    assert admission.reservation({"max_tokens": 100}, body, "embeddings") == admission.prompt_estimate(body)


def test_parse_backends_json_file_and_errors(tmp_path: Path):
    assert parse_backends('{"m": ["http://h:1/"]}') == {"m": ("http://h:1",)}
    path = tmp_path / "b.yaml"
    path.write_text("m: http://h:2\n")
    assert parse_backends(str(path)) == {"m": ("http://h:2",)}
    for bad in ('{"m": []}', '{"m": ["h:1"]}', "[1]", str(tmp_path / "none.json"), "{oops"):
        with pytest.raises(AlbertError, match="Fix|must map"):
            parse_backends(bad)


def test_settings_from_environment(config_factory, monkeypatch, tmp_path):
    config_factory.env(ONE_GPU_HOST + """
    [api]
    port = 9001
    workers = 3
    whitelist_mode = "redact"
    max_tokens_cap = 256
    first_byte_timeout_s = 30
    """)
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
    monkeypatch.setenv("ALBERT_API_KEYS", str(tmp_path / "keys.json"))
    spec = load_spec("test", config_factory.root)
    s = settings_from_spec(spec)
    assert s.backends == {"small": ("http://127.0.0.1:8001",)}
    assert (s.port, s.workers, s.whitelist_mode, s.max_tokens_cap, s.first_byte_timeout_s) == \
        (9001, 3, "redact", 256, 30)
    assert s.keys_path == str(tmp_path / "keys.json")
    s2 = settings_from_spec(spec, {"x": ("http://a:1",)}, port=7000, open_access=True)
    assert s2.backends == {"x": ("http://a:1",)} and s2.port == 7000 and s2.open_access
    assert GatewaySettings.from_json(s2.to_json()) == s2


def test_gateway_without_keys_refuses_to_start(capsys):
    code = main(["api", "--backends", '{"m": ["http://127.0.0.1:9"]}', "--port", "18999"])
    err = capsys.readouterr().err
    assert code == 1 and "no API keys" in err and "--no-auth" in err and "Traceback" not in err


def test_albert_api_process_serves_and_reloads_on_sighup(tmp_path: Path):
    """The real command: `albert api` in a subprocess, keys swapped, SIGHUP."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"name": "a", "sha256": hash_key(KEY)}]))
    new = "k-second-0123456789abcdef"
    with FakeUpstream() as fake:
        port = 18000 + int(time.time() * 1000) % 1000
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pyalbert.cli import run; run()", "api", "--backends", json.dumps({"m": [fake.url]}),
             "--keys", str(keys), "--host", "127.0.0.1", "--port", str(port),
             "--whitelist-mode", "off"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while True:
                try:
                    httpx.get(url + "/health", timeout=1)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stderr.read().decode()
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            chat = {"model": "m", "messages": []}
            post = lambda k: httpx.post(url + "/v1/chat/completions", json=chat,  # noqa: E731
                                        headers={"Authorization": f"Bearer {k}"}).status_code
            assert (post(KEY), post(new)) == (200, 401)
            keys.write_text(json.dumps([{"name": "b", "sha256": hash_key(new)}]))
            proc.send_signal(signal.SIGHUP)
            while post(new) != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert post(KEY) == 401
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=10)
    events = [json.loads(line).get("event") for line in out.decode().splitlines()]
    assert "started" in events and "reloaded" in events
