"""Engine pieces that need no host: typed preflight checks, the Ctrl-C message, error joining."""

from __future__ import annotations

import pytest

from pyalbert.commands.base import Cmd
from pyalbert.engine.fanout import Interrupted, raise_errors
from pyalbert.engine.report import HostResult, interrupted_text, summary_table
from pyalbert.errors import AlbertError
from pyalbert.remote import Result
from pyalbert.runtimes.checks import (
    DiskFree,
    DockerAnswers,
    HostFacts,
    ModelPresent,
    PortFree,
    PythonAtLeast,
    docker_problem,
)

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


def facts_of(running=()):
    return HostFacts("deploy", "staging", "/srv/albert", lambda: set(running))


def result(code, stdout="", stderr="", known=True):
    return Result(Cmd.of("true"), code, stdout, stderr, known=known)


def test_the_docker_check_reads_stderr():
    check = DockerAnswers()
    said = check.verdict(result(127, stderr=NOT_INSTALLED_BASH), facts_of())
    assert said.startswith("docker is not installed (the `docker` command is not found for user "
                           "deploy)")
    assert check.verdict(result(0, "24.0.7\n"), facts_of()) is None
    assert check.blocking


def test_an_unknown_outcome_is_shown_not_judged():
    assert DockerAnswers().verdict(result(0, known=False), facts_of()) is None
    assert DiskFree("/srv", 1024).verdict(result(0, "", known=False), facts_of()) is None


def test_checks_carry_their_own_data_into_the_verdict():
    model = ModelPresent("org/m", "/data/models/org/m")
    assert model.verdict(result(1), facts_of()) == (
        "model org/m is not on the host (/data/models/org/m). Fix: run `fab setup --env staging` "
        "to download it.")
    python = PythonAtLeast("/usr/bin/python3", (3, 10))
    assert python.what == "Python 3.10+ for vLLM (/usr/bin/python3)"
    assert python.verdict(result(0, "3.9\n"), facts_of()).startswith(
        "/usr/bin/python3 is Python 3.9, and vLLM needs Python 3.10 or newer")
    assert python.verdict(result(0, "3.11\n"), facts_of()) is None
    disk = DiskFree("/srv/albert", 1024)
    df = "/dev/sda1 100 50 2048 3% /\n"  # 2048 KiB = 2 MiB free
    assert disk.verdict(result(0, df), facts_of()).startswith(
        "not enough disk: 2 MiB free under /srv/albert, at least 1024 MiB needed")


def test_a_port_held_by_our_unit_is_fine_another_process_is_named():
    port = PortFree(8001, "albert-staging-vllm-m")
    listening = "LISTEN 0 4096 0.0.0.0:8001 0.0.0.0:* users:((\"python3\",pid=7,fd=3))\n"
    assert port.verdict(result(0, ""), facts_of()) is None
    assert port.verdict(result(0, listening), facts_of({"albert-staging-vllm-m"})) is None
    said = port.verdict(result(0, listening), facts_of({"albert-staging-api"}))
    assert said.startswith('port 8001 is already taken by another process (users:(("python3",pid=7,'
                           'fd=3))), not by albert-staging-vllm-m.')


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


def test_a_failed_rollback_is_never_summarised_as_the_previous_release_serving():
    from pyalbert.engine.report import Printer, finish

    ok = HostResult("gpu-1", "rolled back", release="r1 (previous)", error="host gpu-1: not ready")
    broken = HostResult("gpu-2", "failed", release="-",
                        error="host gpu-2: rolled back but NOT serving: m-a exited\n    log line")
    with pytest.raises(AlbertError) as err:
        finish([ok], "deploy", Printer(quiet=True))
    assert "went back to) their previous release" in str(err.value)
    with pytest.raises(AlbertError) as err:
        finish([ok, broken], "deploy", Printer(quiet=True))
    text = str(err.value)
    assert "serve NEITHER release" in text and "previous release" not in text.split("\n")[0]
    assert "host gpu-2: rolled back but NOT serving: m-a exited" in text
