"""Command builders: whole strings, secrets masked in display, optional flags dropped."""

from __future__ import annotations

import pytest

from pyalbert.commands import Cmd, Secret, any_of, chain, combine, pipe, sudo, vllm, write_file
from pyalbert.config.routing import ModelSpec
from pyalbert.remote import LocalRunner


def test_optional_flags_and_nesting():
    cmd = Cmd.of("docker", "run", ("--detach" if True else None), None, False, ["-p", 8080], "img")
    assert cmd.render() == "docker run --detach -p 8080 img"


def test_quoting_is_shell_safe():
    cmd = Cmd.of("echo", "a b", "$(reboot)", "it's")
    assert cmd.render() == "echo 'a b' '$(reboot)' 'it'\"'\"'s'"
    assert LocalRunner().run(cmd).stdout == "a b $(reboot) it's\n"


def test_secrets_are_rendered_for_the_shell_and_masked_for_people():
    cmd = Cmd.of("login", "--password", Secret("hunter2"))
    assert cmd.render() == "login --password hunter2"
    assert cmd.display() == "login --password ***"
    assert str(cmd) == "login --password ***" and "hunter2" not in repr(cmd)


@pytest.mark.parametrize(
    ("combinator", "expected"),
    [(combine, "a && b"), (chain, "a ; b"), (pipe, "a | b"), (any_of, "a || b")],
    ids=["combine", "chain", "pipe", "any_of"],
)
def test_combinators(combinator, expected):
    assert combinator(Cmd.of("a"), None, Cmd.of("b")).render() == expected


def test_sudo_simple_and_compound():
    assert sudo(Cmd.of("mkdir", "-p", "/data")).render() == "sudo -n mkdir -p /data"
    assert sudo(combine(Cmd.of("a"), Cmd.of("b"))).render() == "sudo -n sh -c 'a && b'"


def test_write_file_sends_content_on_stdin_and_is_atomic(tmp_path):
    target = tmp_path / "env file"
    cmd = write_file(str(target), Secret("TOKEN=abc\n"), mode="0600")
    assert "TOKEN" not in cmd.display() and "TOKEN" not in cmd.render()
    assert "[secret, 10 bytes]" in cmd.display()
    LocalRunner().run(cmd)
    assert target.read_text() == "TOKEN=abc\n"
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert list(tmp_path.iterdir()) == [target]


def test_stdin_commands_cannot_be_joined():
    with pytest.raises(ValueError):
        combine(write_file("/x", "y"), Cmd.of("true"))


def test_vllm_server_command_golden():
    model = ModelSpec(model="org/m", port=8001, gpu_mem_use=0.45, tensor_parallel_size=2,
                      quantization="awq", max_model_len=4096, extra_args=("--enforce-eager",))
    cmd = vllm.server("python3", "m-7b", model, model_path="/models/m-7b", extra_args=["--dtype", "half"])
    assert cmd.render() == (
        "python3 -m vllm.entrypoints.openai.api_server --host 0.0.0.0 --port 8001 --model /models/m-7b "
        "--served-model-name m-7b --tensor-parallel-size 2 --gpu-memory-utilization 0.45 "
        "--quantization awq --max-model-len 4096 --dtype half --enforce-eager"
    )
