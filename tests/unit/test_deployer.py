"""Deployer pieces that need no host: preflight verdicts, the Ctrl-C message, error joining."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyalbert.commands import docker
from pyalbert.deployer import (
    HostResult,
    Interrupted,
    docker_problem,
    interrupted_text,
    raise_errors,
    summary_table,
    verdict,
)
from pyalbert.errors import AlbertError
from pyalbert.plans import Check

# stderr of `docker version --format {{.Server.Version}}` over SSH, captured on Ubuntu/Debian
NOT_INSTALLED_BASH = "bash: line 1: docker: command not found\n"
NOT_INSTALLED_DASH = "sh: 1: docker: not found\n"
NO_ACCESS = ("permission denied while trying to connect to the Docker daemon socket at "
             "unix:///var/run/docker.sock: Get \"http://%2Fvar%2Frun%2Fdocker.sock/v1.24/version\""
             ": dial unix /var/run/docker.sock: connect: permission denied\n")
NOT_RUNNING = ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker "
               "daemon running?\n")


@pytest.mark.parametrize("code, output, expected", [
    (127, NOT_INSTALLED_BASH, "docker is not installed (the `docker` command is not found for "
                              "user gitlab). Fix: run `fab provision --env staging`: it installs "
                              "Docker."),
    (127, "", "docker is not installed"),
    (1, NOT_INSTALLED_DASH, "docker is not installed"),
    (1, NO_ACCESS, "user gitlab may not use docker (permission denied on the docker socket: not "
                   "in the docker group). Fix: run `fab provision --env staging`: it adds gitlab "
                   "to the docker group."),
    (1, NOT_RUNNING, "the docker daemon is not running. Fix: run `fab provision --env staging`, "
                     "or start it"),
    (125, "something odd\n", "docker does not answer (exit 125: something odd). Fix: run "
                             "`fab provision --env staging`"),
], ids=["missing-bash", "missing-no-output", "missing-dash", "no-access", "not-running", "other"])
def test_docker_problem_always_says_run_provision(code, output, expected):
    problem = docker_problem(code, output, "gitlab", "staging")
    assert problem is not None and problem.startswith(expected)
    assert "fab provision --env staging" in problem


def test_docker_answering_is_no_problem():
    assert docker_problem(0, "24.0.7\n", "gitlab", "staging") is None


def test_verdict_reads_stderr_of_the_docker_check():
    hp = SimpleNamespace(env="staging", host=SimpleNamespace(user="deploy"))
    check = Check("docker answers", docker.server_version(), "docker")
    said = verdict(check, 127, "", None, hp, stderr=NOT_INSTALLED_BASH)
    assert said.startswith("docker is not installed (the `docker` command is not found for user "
                           "deploy)")
    assert verdict(check, 0, "24.0.7\n", None, hp) is None


def test_interrupted_text_says_where_each_host_ended():
    results = [HostResult("gpu-1", "interrupted", error="host gpu-1: interrupted (Ctrl-C)"),
               HostResult("gpu-2", "deployed"),
               HostResult("gpu-3", "failed", error="host gpu-3: port 8001 is taken\nmore")]
    assert interrupted_text(results) == (
        "interrupted (Ctrl-C): gpu-1 went back to its previous release; gpu-2 had finished "
        "(deployed); gpu-3 failed: host gpu-3: port 8001 is taken. The deploy locks were released.")
    exc = Interrupted(interrupted_text([]), [])
    assert exc.exit_code == 130 and "no host had started" in str(exc)


def test_raise_errors_names_each_host_once():
    with pytest.raises(AlbertError) as info:
        raise_errors({"a": "ok", "b": AlbertError("host b: the GPUs are leased"),
                      "c": AlbertError("ssh refused")}, "link-gpu")
    assert str(info.value) == ("link-gpu failed on 2 of 3 host(s): host b: the GPUs are leased; "
                               "c: ssh refused")
    raise_errors({"a": "ok"}, "link-gpu")  # nothing failed: no error


def test_summary_table_rows():
    table = summary_table([HostResult("gpu-1", "unchanged", release="r1", seconds=0.42),
                           HostResult("gpu-2", "rolled back", release="r2",
                                      changed=["albert-x-vllm-a"])], "deploy")
    assert [c.header for c in table.columns] == ["host", "result", "release", "changed", "time"]
    cells = [list(c.cells) for c in table.columns]
    assert cells[0] == ["gpu-1", "gpu-2"] and cells[3] == ["-", "albert-x-vllm-a"]
    assert cells[1] == ["[green]unchanged[/]", "[red]rolled back[/]"] and cells[4][0] == "0.4s"
