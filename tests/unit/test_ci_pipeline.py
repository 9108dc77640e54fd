"""ci.pipeline run and ci.lint against the fake GitLab (python-gitlab unchanged)."""

from __future__ import annotations

import pytest

from ci import lint, pipeline
from ci.pipeline_file import PIPELINE_FILE
from tests.support.fake_gitlab import JobSpec, serve

STAGING_JOBS = [
    JobSpec("link gpu", "link gpu", log="lease taken\n"),
    JobSpec("build:vllm", "build", needs=[]),
    JobSpec("build:api", "build", needs=[]),
    JobSpec("setup:vllm", "setup", needs=["link gpu"], log="downloaded 2 models\n"),
    JobSpec("setup:api", "setup", needs=["link gpu"]),
    JobSpec("deploy:vllm", "deploy", when="manual", needs=["build:vllm", "setup:vllm"]),
    JobSpec("deploy:api", "deploy", when="manual", needs=["build:api", "setup:api"]),
    JobSpec("test:smoke", "test", needs=["deploy:vllm", "deploy:api"], log="3 passed\n"),
    JobSpec("unlink gpu", "unlink gpu", when="always", log="lease released\n"),
]


@pytest.fixture
def fake(monkeypatch):
    fake = serve(monkeypatch, pipeline_jobs=[JobSpec(**vars(j)) for j in STAGING_JOBS])
    yield fake
    fake.stop()


def run(*args: str) -> int:
    return pipeline.main(["run", "--interval", "0", "--timeout", "30", *args])


def job_status(fake) -> dict[str, str]:
    (p,) = fake.pipelines.values()
    return {j.spec.name: j.status for j in p.jobs}


def test_deploy_plays_the_manual_jobs_and_follows_to_success(fake, capsys):
    assert run("--ref", "staging", "--deploy") == 0
    out = capsys.readouterr().out
    assert sorted(fake.played) == ["deploy:api", "deploy:vllm"]
    assert set(job_status(fake).values()) == {"success"}
    (p,) = fake.pipelines.values()
    assert p.ref == "staging"
    assert "setup:vllm | downloaded 2 models" in out and "unlink gpu | lease released" in out
    assert "[deploy] deploy:vllm: played" in out
    assert out.index("link gpu | lease taken") < out.index("test:smoke | 3 passed")
    assert out.rstrip().splitlines()[-1].startswith(f"pipeline {p.id}: success")
    # every trace line printed once
    assert out.count("test:smoke | 3 passed") == 1


def test_failed_deploy_fails_the_run_and_still_unlinks(fake, capsys):
    fake.pipeline_jobs[5].result = "failed"
    assert run("--ref", "staging", "--deploy") == 1
    status = job_status(fake)
    assert status["deploy:vllm"] == "failed" and status["test:smoke"] == "skipped"
    assert status["unlink gpu"] == "success"
    out = capsys.readouterr().out
    assert "deploy:vllm | ERROR: Job failed" in out and ": failed http" in out


def test_wait_without_deploy_stops_at_the_deploy_button(fake, capsys):
    assert run("--ref", "staging", "--wait") == 0
    assert fake.played == []
    assert job_status(fake)["deploy:vllm"] == "manual"
    assert "waits for a manual job (the deploy button)" in capsys.readouterr().out


def test_without_wait_only_triggers(fake, capsys):
    assert run("--ref", "main", "--variable", "DRY=1") == 0
    (p,) = fake.pipelines.values()
    assert (p.ref, p.variables) == ("main", [{"key": "DRY", "value": "1"}])
    assert set(job_status(fake).values()) == {"created"}
    assert f"pipeline {p.id} on main" in capsys.readouterr().out


def test_timeout_exits_2_with_the_pipeline_url(fake, capsys):
    assert pipeline.main(["run", "--ref", "staging", "--deploy", "--interval", "0", "--timeout", "0"]) == 2
    assert "is still running after 0 s" in " ".join(capsys.readouterr().err.split())


def test_pipeline_rejected_by_rules_is_a_clear_error(fake, capsys):
    fake.pipeline_jobs.clear()
    assert run("--ref", "feature") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "refused to create a pipeline on 'feature' (400)" in err


def test_reporter_cannot_press_the_deploy_button(fake, capsys):
    fake.tokens["good-token"] = "reporter"
    assert run("--ref", "staging", "--deploy") == 1
    assert "may not play the manual job 'deploy:" in " ".join(capsys.readouterr().err.split())


# --- ci.lint ----------------------------------------------------------------------------------
def test_lint_sends_the_pipeline_file(fake, capsys):
    assert lint.main([]) == 0
    assert ("POST", "/api/v4/projects/42/ci/lint") in fake.requests
    assert ".gitlab-ci.yml is valid" in capsys.readouterr().out


def test_lint_reports_gitlab_errors(fake, tmp_path, capsys):
    broken = tmp_path / ".gitlab-ci.yml"
    broken.write_text(PIPELINE_FILE.read_text().replace("needs: [build:api, setup:api]",
                                                        "needs: [build:api, setup:apii]"))
    assert lint.main([str(broken), "--dry-run", "--ref", "staging"]) == 1
    err = capsys.readouterr().err
    assert "'setup:apii' does not exist" in err and "is invalid" in err


def test_lint_bad_token(fake, monkeypatch, capsys):
    monkeypatch.setenv("GITLAB_TOKEN", "nope")
    assert lint.main([]) == 1
    assert "(401)" in capsys.readouterr().err
