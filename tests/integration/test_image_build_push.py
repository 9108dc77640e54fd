"""``albert image build|push`` on the root-namespace dockerd with a local registry.

The base is a fake "vLLM OpenAI server" image (static busybox, a few MB): its server
speaks just enough (``/health``, ``/v1/models``) and reports the arguments it was started with,
so the test sees that the baked image runs with *no* arguments and serves the baked weights on
port 8000. Then the image goes through Debian's docker-registry (htpasswd auth) and back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pyalbert.cli import main
from tests.support.images import build, docker, ensure_dockerd, image_exists
from tests.support.registry import free_port, local_registry

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("dockerd") or not os.path.exists("/usr/bin/docker-registry"),
    reason="needs root, dockerd and docker-registry",
)
BUSYBOX = "/bin/busybox"  # static (busybox-static)

FAKE_SERVER = r'''#!/bin/sh
# Fake "python3 -m vllm.entrypoints.openai.api_server ARGS": busybox httpd serving /health and a
# /v1/models that reports the arguments, the model directory's files and HF_HUB_OFFLINE.
if [ "$1" = "-c" ]; then  # the image's HEALTHCHECK
    exec wget -q -O /dev/null http://127.0.0.1:8000/health
fi
shift 2
argv=""
for a in "$@"; do argv="$argv${argv:+, }\"$(printf %s "$a" | sed 's/[\\"]/\\&/g')\""; done
port=8000
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port="$2" ;; --model) model="$2" ;; --served-model-name) name="$2" ;;
    esac
    shift
done
files=""
for f in $(ls -A "$model" 2>/dev/null); do files="$files${files:+, }\"$f\""; done
mkdir -p /www/v1
: > /www/health
printf '{"object": "list", "data": [{"id": "%s", "root": "%s", "albert_argv": [%s], "albert_files": [%s], "albert_offline": "%s"}]}' \
    "$name" "$model" "$argv" "$files" "$HF_HUB_OFFLINE" > /www/v1/models
exec httpd -f -p "$port" -h /www
'''

ENV = """
storage_dir = "{storage}"
[images]
vllm = "{base}"
[[hosts]]
name = "node"
address = "127.0.0.1"
gpus = 1
gpu_memory_gb = 24
[deploy]
ready_timeout_s = 120
"""
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
               "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
               "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 1024,
               "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def fake_vllm_base(tmp_path_factory) -> str:
    """A 2 MB stand-in for vllm/vllm-openai: static busybox, ``python3`` is the script above."""
    ensure_dockerd()
    tag = "albert-test/fake-vllm-openai:busybox"
    if not image_exists(tag):
        context = tmp_path_factory.mktemp("fake-vllm")
        shutil.copy(BUSYBOX, context / "busybox")
        (context / "python3").write_text(FAKE_SERVER)
        (context / "python3").chmod(0o755)
        (context / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            "COPY python3 /usr/bin/python3\nENV PATH=/usr/bin:/bin\n"
            'ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]\n')
        build(context, tag)
    return tag


@pytest.fixture
def config(tmp_path: Path, fake_vllm_base: str, config_factory) -> Path:
    storage = tmp_path / "models"
    weights = storage / "tiny"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text(json.dumps(TINY_CONFIG))
    (weights / "model.safetensors").write_bytes(os.urandom(4096))
    config_factory.env(ENV.format(storage=storage, base=fake_vllm_base))
    config_factory.routing({"tiny": {"model": "test/tiny-llama", "port": 8001, "gpu_mem_use": 0.5,
                                     "max_model_len": 512}})
    return config_factory.root


def _wait_json(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_build_run_without_arguments_push_and_pull(config: Path, tmp_path: Path, capsys, monkeypatch):
    unique = uuid.uuid4().hex[:8]
    tag = f"albert-test/baked-tiny:{unique}"
    common = ["--env", "test", "--config-dir", str(config), "--model", "tiny", "--bake-weights",
              "--tag", tag]
    container = f"albert-test-baked-{unique}"
    pushed = []
    try:
        # build, then a second build finds nothing to do
        assert main(["image", "build", *common]) == 0
        out, err = capsys.readouterr()
        assert f"built {tag}" in out
        assert "tiny: needs" in err  # preflight ran on the local config.json
        assert main(["image", "build", *common]) == 0
        assert "is up to date" in capsys.readouterr().out

        labels = json.loads(docker("image", "inspect", "--format", "{{ json .Config.Labels }}", tag).stdout)
        assert labels["albert.model.repo"] == "test/tiny-llama"
        assert labels["org.opencontainers.image.revision"] == "main"
        assert labels["albert.weights"] == "baked"

        # the platform runs it as is: no arguments, port 8000
        port = free_port()
        docker("run", "-d", "--name", container, "-p", f"127.0.0.1:{port}:8000", tag)
        models = _wait_json(f"http://127.0.0.1:{port}/v1/models")["data"][0]
        assert models["id"] == "tiny"
        assert models["root"] == "/models/tiny"
        assert {"config.json", "model.safetensors"} <= set(models["albert_files"])
        assert models["albert_offline"] == "1"
        assert models["albert_argv"][:4] == ["--host", "0.0.0.0", "--port", "8000"]
        assert "--max-model-len" in models["albert_argv"]

        with local_registry(tmp_path / "registry", user="ci", password=f"pw-{unique}") as registry:
            # a wrong token: docker login fails, the token is not in the message
            monkeypatch.setenv("REGISTRY_USER", "ci")
            monkeypatch.setenv("REGISTRY_TOKEN", "wrong-token")
            push = ["image", "push", *common, "--registry", f"{registry.host}/albert"]
            assert main(push) == 3
            err = capsys.readouterr().err
            assert "docker login" in err and "wrong-token" not in err

            monkeypatch.setenv("REGISTRY_TOKEN", registry.password)
            assert main(push) == 0
            out = capsys.readouterr().out
            remote = f"{registry.host}/albert/albert-test-vllm-tiny:main-baked"
            pushed.append(remote)
            assert f"pushed {remote}" in out and "sha256:" in out
            home_config = Path.home() / ".docker" / "config.json"
            assert not home_config.exists() or registry.host not in home_config.read_text()

            # pull it back as a node would, with its own credentials
            docker("image", "rm", remote)
            assert not image_exists(remote)
            login_dir = tmp_path / "docker-config"
            env = {**os.environ, "DOCKER_CONFIG": str(login_dir)}
            subprocess.run(["docker", "login", "-u", "ci", "--password-stdin", registry.host],
                           input=registry.password, text=True, check=True, capture_output=True, env=env)
            subprocess.run(["docker", "pull", remote], check=True, capture_output=True, env=env)
            pulled = docker("image", "inspect", "--format", "{{ .Id }}", remote).stdout
            assert pulled == docker("image", "inspect", "--format", "{{ .Id }}", tag).stdout
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        for ref in (tag, *pushed):
            subprocess.run(["docker", "image", "rm", "-f", ref], capture_output=True)
