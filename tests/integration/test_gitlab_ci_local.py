"""The real .gitlab-ci.yml run by gitlab-ci-local (shell executor) with recording shims.

``fab``, ``albert``, ``docker`` and ``pip`` are shims first on PATH that append their argv (and
the job's environment name and SSH key file content) to a log, so order and arguments are
asserted without hosts. The project's CI/CD variables come from a gitlab-ci-local variables file
with environment-scoped File values, as ``python -m ci.variables sync`` would set them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ci.pipeline_file import REPO

TOOLS = ("fab", "albert", "docker", "pip")
SHIM = """#!/usr/bin/env python3
import json, os, sys
path = os.environ.get("SSH_PRIVATE_KEY")
record = {
    "tool": os.path.basename(sys.argv[0]),
    "argv": sys.argv[1:],
    "job": os.environ.get("CI_JOB_NAME"),
    "environment": os.environ.get("CI_ENVIRONMENT_NAME") or None,
    "ssh_key": open(path).read() if path and os.path.isfile(path) else None,
}
with open(os.environ["SHIM_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
fail = os.environ.get("SHIM_FAIL")
if fail and fail == " ".join(sys.argv[1:]):
    print("shim: failing on purpose", file=sys.stderr)
    sys.exit(1)
"""
VARIABLES = """\
SSH_PRIVATE_KEY:
  type: file
  values:
    staging: staging-key
    production: production-key
SSH_KNOWN_HOSTS:
  type: file
  values:
    '*': "staging.albert.internal ssh-ed25519 AAAA"
"""
#: (before, after): every call of the first job comes before any call of the second
STAGING_EDGES = [
    ("link gpu", "setup:vllm"), ("link gpu", "setup:api"),
    ("build:vllm", "deploy:vllm"), ("setup:vllm", "deploy:vllm"),
    ("build:api", "deploy:api"), ("setup:api", "deploy:api"),
    ("deploy:vllm", "test:vllm"), ("deploy:api", "test:api"),
    ("test:vllm", "unlink gpu"), ("test:api", "unlink gpu"),
    ("build:vllm", "unlink gpu"), ("build:api", "unlink gpu"),
]
LANES = {"vllm": ["link gpu", "build:vllm", "setup:vllm", "deploy:vllm", "test:vllm"],
         "api": ["link gpu", "build:api", "setup:api", "deploy:api", "test:api"]}
STAGING_JOBS = {*LANES["vllm"], *LANES["api"], "unlink gpu"}


def smoke_argv(service: str, env: str = "staging") -> list[str]:
    return ["smoke", service, "--env", env, "--junit", f"smoke-{service}.xml"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the repository's tracked files, committed in a fresh git repo, plus shims."""
    if not shutil.which("gitlab-ci-local") or not shutil.which("rsync"):
        pytest.fail("gitlab-ci-local (npm) and rsync are needed: run ./scripts/bootstrap")
    root = tmp_path_factory.mktemp("gcl")
    work = root / "project"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    (work / ".gitlab-ci-local-variables.yml").write_text(VARIABLES)
    git = ["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q", "-b", "staging"], cwd=work, check=True)
    (work / ".gitignore").write_text(".gitlab-ci-local/\n")
    subprocess.run([*git, "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "pipeline under test"], cwd=work, check=True)
    shims = root / "shims"
    shims.mkdir()
    for tool in TOOLS:
        (shims / tool).write_text(SHIM)
        (shims / tool).chmod(0o755)
    return work


def gitlab_ci_local(project: Path, *args: str, fail: str = "", timeout: int = 120):
    log = project.parent / "shim.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{project.parent / 'shims'}:{os.environ['PATH']}",
           "SHIM_LOG": str(log), "SHIM_FAIL": fail}
    for name in ("GITLAB_TOKEN", "CI_JOB_TOKEN", "SSH_PRIVATE_KEY", "SSH_KNOWN_HOSTS"):
        env.pop(name, None)
    result = subprocess.run(
        ["gitlab-ci-local", "--home", str(project.parent / "home"),
         "--json-schema-validation=false", "--ignore-predefined-vars",
         "CI_COMMIT_BRANCH,CI_PIPELINE_SOURCE", *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=timeout,
    )
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, records


def listed(project: Path, *variables: str) -> set[str]:
    args = [a for v in variables for a in ("--variable", v)]
    result, _ = gitlab_ci_local(project, "--list-csv", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.count(";") >= 2]
    return {line.split(";")[0].strip('"') for line in lines[1:]}


def calls(records: list[dict], tool: str) -> list[dict]:
    return [r for r in records if r["tool"] == tool]


def assert_order(records: list[dict], edges: list[tuple[str, str]]) -> None:
    jobs = [r["job"] for r in records if r["tool"] in {"fab", "albert", "docker"}]
    for before, after in edges:
        assert before in jobs and after in jobs, (before, after, jobs)
        last = len(jobs) - 1 - jobs[::-1].index(before)
        assert last < jobs.index(after), f"{before} must end before {after} starts: {jobs}"


def test_list_shows_the_jobs_of_each_branch(project):
    staging = listed(project, "CI_COMMIT_BRANCH=staging")
    assert staging == STAGING_JOBS
    assert listed(project, "CI_COMMIT_BRANCH=main") == staging - {"link gpu", "unlink gpu"}
    assert listed(project, "CI_PIPELINE_SOURCE=merge_request_event",
                  "CI_COMMIT_BRANCH=feature") == {"test:unit"}
    assert listed(project, "CI_COMMIT_BRANCH=feature") == set()


def test_staging_pipeline_runs_in_order_with_deploys_played(project):
    result, records = gitlab_ci_local(
        project, "--force-shell-executor", "--variable", "CI_COMMIT_BRANCH=staging",
        "--manual", "deploy:vllm", "--manual", "deploy:api")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert_order(records, STAGING_EDGES)
    fab = {r["job"]: r["argv"] for r in calls(records, "fab")}
    assert fab == {
        "link gpu": ["-r", "deploy", "link-gpu", "--env", "staging"],
        "setup:vllm": ["-r", "deploy", "setup", "--env", "staging", "--service", "vllm"],
        "setup:api": ["-r", "deploy", "setup", "--env", "staging", "--service", "api"],
        "deploy:vllm": ["-r", "deploy", "deploy", "--env", "staging", "--service", "vllm"],
        "deploy:api": ["-r", "deploy", "deploy", "--env", "staging", "--service", "api"],
        "unlink gpu": ["-r", "deploy", "unlink-gpu", "--env", "staging"],
    }
    smokes = calls(records, "albert")
    assert {r["job"]: r["argv"] for r in smokes} == {"test:vllm": smoke_argv("vllm"),
                                                     "test:api": smoke_argv("api")}
    assert len(smokes) == 2
    # host-side jobs run in the staging environment and get its scoped SSH key file;
    # image builds get no environment and no key
    for record in calls(records, "fab") + smokes:
        assert (record["environment"], record["ssh_key"]) == ("staging", "staging-key"), record
    pushes = [r for r in calls(records, "docker") if r["argv"][0] == "push"]
    assert sorted(p["argv"][1].rsplit("/", 1)[1].split(":")[0] for p in pushes) == ["api", "vllm"]
    assert all(r["ssh_key"] is None and r["environment"] is None for r in calls(records, "docker"))


@pytest.mark.parametrize(("lane", "other"), [("vllm", "api"), ("api", "vllm")])
def test_deploying_one_lane_runs_its_test_and_not_the_others(project, lane, other):
    """Only deploy:<lane> played: gitlab-ci-local runs test:<lane> with everything it needs (the
    lane, as GitLab runs it once that button is played) and no job of the other lane. The whole
    pipeline with one button played is refused: the other lane's test waits for its own button
    (in GitLab the pipeline waits there; unlink gpu runs once both lanes ended)."""
    result, records = gitlab_ci_local(
        project, "--force-shell-executor", "--variable", "CI_COMMIT_BRANCH=staging",
        "--manual", f"deploy:{lane}", "--needs", f"test:{lane}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    ran = {r["job"] for r in records if r["tool"] in {"fab", "albert", "docker"}}
    assert ran == set(LANES[lane])
    assert_order(records, [(a, b) for a, b in STAGING_EDGES if {a, b} <= set(LANES[lane])])
    (smoke,) = calls(records, "albert")
    assert (smoke["job"], smoke["argv"]) == (f"test:{lane}", smoke_argv(lane))
    assert not any(r["job"].endswith(f":{other}") for r in records)

    whole, records = gitlab_ci_local(
        project, "--force-shell-executor", "--variable", "CI_COMMIT_BRANCH=staging",
        "--manual", f"deploy:{lane}")
    assert whole.returncode != 0 and records == []
    assert f"deploy:{other} is when:manual, its needed by test:{other}" in whole.stdout + whole.stderr


def test_main_deploys_production_without_gpu_link(project):
    result, records = gitlab_ci_local(
        project, "--force-shell-executor", "--variable", "CI_COMMIT_BRANCH=main",
        "--manual", "deploy:vllm", "--manual", "deploy:api")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    fab = calls(records, "fab")
    assert {r["job"] for r in fab} == {"setup:vllm", "setup:api", "deploy:vllm", "deploy:api"}
    assert all(r["argv"][4] == "production" and r["ssh_key"] == "production-key" for r in fab)
    assert sorted(r["argv"] for r in calls(records, "albert")) == [
        smoke_argv("api", "production"), smoke_argv("vllm", "production")]


@pytest.mark.parametrize("lane", ["vllm", "api"])
def test_unlink_gpu_runs_last_after_a_failed_lane_test(project, lane):
    """One lane's test fails: the other lane's test still runs, and unlink gpu (when: always)
    frees the GPU last."""
    result, records = gitlab_ci_local(
        project, "--force-shell-executor", "--variable", "CI_COMMIT_BRANCH=staging",
        "--manual", "deploy:vllm", "--manual", "deploy:api", fail=" ".join(smoke_argv(lane)))
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"FAIL  test:{lane}" in out and "PASS  unlink gpu" in out
    assert {r["job"] for r in calls(records, "albert")} == {"test:vllm", "test:api"}
    jobs = [r["job"] for r in records if r["tool"] in {"fab", "albert"}]
    assert jobs[-1] == "unlink gpu" and jobs.count("unlink gpu") == 1


def test_unlink_gpu_runs_after_a_failed_deploy(project):
    """A forced deploy failure: no test of that lane, and unlink gpu (when: always) still frees
    the GPU.

    gitlab-ci-local 4.73 never marks a job whose needs failed as skipped (GitLab does), so with
    test:vllm selected it never starts the last stage; the whole pipeline is run first to show
    the failure stops that lane's test (the api lane's still runs), then every job but test:vllm
    to show unlink gpu runs.
    """
    fail = "-r deploy deploy --env staging --service vllm"
    common = ("--force-shell-executor", "--variable", "CI_COMMIT_BRANCH=staging",
              "--manual", "deploy:vllm", "--manual", "deploy:api")
    result, records = gitlab_ci_local(project, *common, fail=fail)
    assert result.returncode != 0
    jobs = [r["job"] for r in records if r["tool"] in {"fab", "albert"}]
    assert "deploy:vllm" in jobs and "test:vllm" not in jobs and "test:api" in jobs

    selection = sorted(STAGING_JOBS - {"test:vllm"})
    result, records = gitlab_ci_local(project, *common, *selection, fail=fail)
    assert result.returncode != 0
    assert "FAIL  deploy:vllm" in result.stdout + result.stderr
    jobs = [r["job"] for r in records if r["tool"] in {"fab", "albert"}]
    assert jobs[-1] == "unlink gpu" and jobs.index("deploy:vllm") < jobs.index("unlink gpu")
    assert calls(records, "fab")[-1]["argv"] == ["-r", "deploy", "unlink-gpu", "--env", "staging"]
