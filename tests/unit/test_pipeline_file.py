"""The pipeline file: schema, yamllint, stages, rules per branch, the needs DAG, deploy jobs."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ci import pipeline_file as pf
from ci.requirements import required_variables
from pyalbert.config import load_spec

REPO = pf.REPO
BIN = Path(sys.executable).parent
STAGES = ["link gpu", "build", "setup", "deploy", "test", "unlink gpu"]
DOC = pf.load()


# --- a small resolver: extends (deep merge, arrays replaced) and !reference ------------------
def _deref(value, doc):
    if isinstance(value, pf.Reference):
        target = doc
        for part in value.path:
            target = target[part]
        return _deref(copy.deepcopy(target), doc)
    if isinstance(value, list):
        out = []
        for item in value:
            item_is_ref = isinstance(item, pf.Reference)
            item = _deref(item, doc)
            out.extend(item if item_is_ref and isinstance(item, list) else [item])
        return out
    if isinstance(value, dict):
        return {k: _deref(v, doc) for k, v in value.items()}
    return value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(name: str, doc: dict = DOC) -> dict:
    body = doc[name]
    parents = body.get("extends", [])
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = _merge(merged, resolve(parent, doc))
    merged = _merge(merged, {k: v for k, v in body.items() if k != "extends"})
    return _deref(merged, doc)


JOBS = {name: resolve(name) for name in pf.jobs(DOC)}


def _true(cond: str, variables: dict[str, str]) -> bool:
    m = re.fullmatch(r'\$(\w+)(?:\s*==\s*"([^"]*)")?', cond.strip())
    assert m, f"condition too clever for this test: {cond!r}"
    value = variables.get(m.group(1), "")
    return value == m.group(2) if m.group(2) is not None else bool(value)


def _first_rule(rules: list[dict], variables: dict[str, str]) -> dict | None:
    for rule in rules:
        if "if" not in rule or _true(rule["if"], variables):
            return rule
    return None


def pipeline_for(variables: dict[str, str]) -> dict[str, str]:
    """job name -> when, for a push/MR with these predefined variables ({} if no pipeline)."""
    rule = _first_rule(DOC["workflow"]["rules"], variables)
    if rule is None or rule.get("when") == "never":
        return {}
    variables = {**variables, **rule.get("variables", {})}
    out = {}
    for name, job in JOBS.items():
        chosen = _first_rule(job.get("rules", [{}]), variables)
        if chosen and chosen.get("when") != "never":
            out[name] = chosen.get("when", "on_success")
    return out


STAGING = {"CI_COMMIT_BRANCH": "staging", "CI_PIPELINE_SOURCE": "push"}
MAIN = {"CI_COMMIT_BRANCH": "main", "CI_PIPELINE_SOURCE": "push"}
MR = {"CI_PIPELINE_SOURCE": "merge_request_event", "CI_MERGE_REQUEST_TITLE": "x"}


# --- validators -------------------------------------------------------------------------------
def test_gitlab_ci_schema_validates():
    tool = shutil.which("check-jsonschema", path=str(BIN)) or shutil.which("check-jsonschema")
    assert tool, "check-jsonschema is in the dev extra: ./scripts/bootstrap"
    result = subprocess.run([tool, "--builtin-schema", "vendor.gitlab-ci", "--data-transform", "gitlab-ci",
                             str(pf.PIPELINE_FILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_is_clean():
    result = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint"),
                             str(pf.PIPELINE_FILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_in_mission_order():
    assert DOC["stages"] == STAGES


# --- rules per branch -------------------------------------------------------------------------
def test_staging_runs_the_whole_chain_with_gpu_link():
    assert pipeline_for(STAGING) == {
        "link gpu": "on_success", "build:vllm": "on_success", "build:api": "on_success",
        "setup:vllm": "on_success", "setup:api": "on_success", "deploy:vllm": "manual",
        "deploy:api": "manual", "test:vllm": "on_success", "test:api": "on_success",
        "unlink gpu": "always",
    }


def test_main_deploys_production_without_gpu_link():
    jobs = pipeline_for(MAIN)
    assert set(jobs) == {"build:vllm", "build:api", "setup:vllm", "setup:api", "deploy:vllm",
                         "deploy:api", "test:vllm", "test:api"}
    assert pf.branches(DOC) == {"staging": "staging", "main": "production"}


def test_merge_requests_get_lint_and_unit_tests_only():
    assert pipeline_for(MR) == {"test:unit": "on_success"}
    assert JOBS["test:unit"]["script"] == "./scripts/test quick"


@pytest.mark.parametrize("variables", [{"CI_COMMIT_BRANCH": "feature/x", "CI_PIPELINE_SOURCE": "push"},
                                       {"CI_COMMIT_TAG": "v1", "CI_PIPELINE_SOURCE": "push"}],
                         ids=["other-branch", "tag"])
def test_other_refs_start_no_pipeline(variables):
    assert pipeline_for(variables) == {}


# --- the DAG ----------------------------------------------------------------------------------
def _needs(job: dict) -> list[str]:
    return [n["job"] if isinstance(n, dict) else n for n in job.get("needs", [])]


def _ancestors(name: str) -> set[str]:
    seen: set[str] = set()
    todo = _needs(JOBS[name])
    while todo:
        job = todo.pop()
        if job not in seen:
            seen.add(job)
            todo += _needs(JOBS[job])
    return seen


def test_needs_name_jobs_of_earlier_stages():
    for name, job in JOBS.items():
        for need in _needs(job):
            assert need in JOBS, f"{name} needs unknown job {need}"
            assert STAGES.index(JOBS[need]["stage"]) < STAGES.index(job["stage"]), (name, need)


def test_needs_express_the_real_dag():
    assert _ancestors("deploy:vllm") == {"build:vllm", "setup:vllm", "link gpu"}
    assert _ancestors("deploy:api") == {"build:api", "setup:api", "link gpu"}  # no model download
    # each lane's test needs its own deploy only: one deploy button played runs that lane's test
    assert _ancestors("test:vllm") == {"deploy:vllm", "build:vllm", "setup:vllm", "link gpu"}
    assert _ancestors("test:api") == {"deploy:api", "build:api", "setup:api", "link gpu"}
    assert _needs(JOBS["build:vllm"]) == _needs(JOBS["build:api"]) == []
    # link gpu exists on staging only: needing it must be optional
    for name, job in JOBS.items():
        for need in job.get("needs", []):
            if (need["job"] if isinstance(need, dict) else need) == "link gpu":
                assert isinstance(need, dict) and need.get("optional") is True, name


def test_unlink_gpu_always_runs_last():
    job = JOBS["unlink gpu"]
    assert job["stage"] == STAGES[-1] and "needs" not in job  # waits for every earlier stage
    assert [r.get("when") for r in job["rules"]] == ["always"]
    # ... so after both lanes' tests: it stops the vLLM servers the api test goes through
    assert {JOBS["test:vllm"]["stage"], JOBS["test:api"]["stage"]} == {"test"}


# --- deploys and environments -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["deploy:vllm", "deploy:api"])
def test_deploys_are_manual_serialized_and_tracked(name):
    job = JOBS[name]
    assert [r.get("when") for r in job["rules"]] == ["manual"]
    assert job["resource_group"] == "$ALBERT_ENV"
    assert job["environment"] == {"name": "$ALBERT_ENV", "url": "$ALBERT_ENV_URL",
                                  "deployment_tier": "$ALBERT_TIER", "action": "start"}


@pytest.mark.parametrize("name", ["setup:vllm", "setup:api"])
def test_setups_of_one_environment_never_overlap(name):
    # both install the tools venv on the same hosts
    assert JOBS[name]["resource_group"] == "setup-$ALBERT_ENV"


def test_every_job_that_reaches_hosts_gets_the_environment_scope():
    for name, job in JOBS.items():
        script = job["script"] if isinstance(job["script"], str) else " ".join(job["script"])
        if script.startswith(("fab ", "albert ")):
            assert job["environment"]["name"] == "$ALBERT_ENV", name
            assert job["environment"]["action"] in {"prepare", "start", "verify", "access"}, name


def test_deploy_side_jobs_are_one_call_of_fab_or_albert():
    host_side = {n: j for n, j in JOBS.items() if not n.startswith(("build:", "test:unit"))}
    expected = {
        "link gpu": 'fab -r deploy link-gpu --env "$ALBERT_ENV"',
        "setup:vllm": 'fab -r deploy setup --env "$ALBERT_ENV" --service vllm',
        "setup:api": 'fab -r deploy setup --env "$ALBERT_ENV" --service api',
        "deploy:vllm": 'fab -r deploy deploy --env "$ALBERT_ENV" --service vllm',
        "deploy:api": 'fab -r deploy deploy --env "$ALBERT_ENV" --service api',
        "test:vllm": 'albert smoke vllm --env "$ALBERT_ENV" --junit smoke-vllm.xml',
        "test:api": 'albert smoke api --env "$ALBERT_ENV" --junit smoke-api.xml',
        "unlink gpu": 'fab -r deploy unlink-gpu --env "$ALBERT_ENV"',
    }
    assert {n: _argv(j) for n, j in host_side.items()} == {n: shlex.split(c) for n, c in expected.items()}


@pytest.mark.parametrize("service", ["vllm", "api"])
def test_each_lane_test_keeps_its_junit_report(service):
    job = JOBS[f"test:{service}"]
    assert job["stage"] == "test" and job["environment"]["action"] == "verify"
    assert job["artifacts"]["when"] == "always"
    report = _expand(job["artifacts"]["reports"]["junit"], job)
    assert report == f"smoke-{service}.xml" and _argv(job)[-2:] == ["--junit", report]


def _expand(text: str, job: dict) -> str:
    """The job's own variables substituted, as the runner does (others stay as they are)."""
    for name, value in (job.get("variables") or {}).items():
        text = re.sub(rf"\$({name}\b|\{{{name}\}})", value, text)
    return text


def _argv(job: dict) -> list[str]:
    """The one-line script as the shell splits it, the job's variables expanded."""
    return shlex.split(_expand(job["script"], job))


def test_every_lane_job_is_a_stage_template_plus_a_service_template():
    raw = pf.jobs(DOC)
    for stage in ("build", "setup", "deploy", "test"):
        for service in ("vllm", "api"):
            name = f"{stage}:{service}"
            assert raw[name]["extends"] == [f".{stage}-job", f".{service}"], name
            assert set(raw[name]) <= {"extends", "needs"}, f"{name} repeats what its templates say"
            assert JOBS[name]["variables"]["SERVICE"] == service


def test_builds_push_the_commit_image_of_their_service():
    for service in ("vllm", "api"):
        job = JOBS[f"build:{service}"]
        assert job["variables"]["SERVICE"] == service
        assert job["variables"]["IMAGE"] == "$CI_REGISTRY_IMAGE/$SERVICE:$CI_COMMIT_SHA"
        assert job["script"][-1] == 'docker push "$IMAGE"'
        assert "--password-stdin" in job["before_script"][0]


def test_no_copy_paste_between_jobs():
    raw = pf.jobs(DOC)
    # scripts, before_scripts, environments and rules of the raw jobs: defined once each
    for key in ("script", "before_script", "environment", "resource_group", "artifacts"):
        seen: dict[str, str] = {}
        for name, body in raw.items():
            if key in body and key != "environment":
                text = repr(body[key])
                assert text not in seen, f"{key} of {name} repeats {seen.get(text)}"
                seen[text] = name
    for name, body in raw.items():
        assert "extends" in body, f"{name} extends no template"
        assert "before_script" not in body or body["before_script"] == [], name
        for rule in body.get("rules", []):
            assert isinstance(rule, pf.Reference), f"{name}: rules come from .rules via !reference"


def test_ssh_trust_comes_from_variables_only():
    text = pf.PIPELINE_FILE.read_text()
    assert "ssh-keyscan" not in text and "StrictHostKeyChecking" not in text


# --- one source of truth ----------------------------------------------------------------------
@pytest.mark.parametrize("env", sorted(pf.environments(DOC)))
def test_workflow_environment_facts_match_the_config(env):
    spec = load_spec(env, REPO / "config")
    variables = pf.environments(DOC)[env]
    assert variables["ALBERT_TIER"] == spec.env.tier
    assert variables["ALBERT_ENV_URL"] == spec.env.url
    assert (variables.get("ALBERT_GPU_LINK") == "true") == spec.env.gpu_link.enabled


def test_every_variable_the_file_uses_is_defined_somewhere():
    text = pf.PIPELINE_FILE.read_text()
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text))
    defined = set(DOC.get("variables", {}))
    for rule in DOC["workflow"]["rules"]:
        defined |= set(rule.get("variables", {}))
    for body in DOC.values():
        if isinstance(body, dict):
            defined |= set(body.get("variables", {}) or {})
    for env in pf.environments(DOC):
        defined |= {v.key for v in required_variables(load_spec(env, REPO / "config"))}
    unknown = {v for v in used - defined if not v.startswith(("CI_", "GITLAB_"))}
    assert unknown == set()
