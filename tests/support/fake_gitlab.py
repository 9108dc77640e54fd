"""A local GitLab REST server (127.0.0.1) for the ci/ helpers, used through python-gitlab unchanged.

Implements the endpoints they call, with the shapes of GitLab's API docs:

- ``GET/POST /projects/:id/variables``, ``PUT /projects/:id/variables/:key?filter[environment_scope]=``
- ``POST /projects/:id/pipeline``, ``GET /projects/:id/pipelines/:pid``, ``.../pipelines/:pid/jobs``
- ``POST /projects/:id/jobs/:jid/play``, ``GET /projects/:id/jobs/:jid/trace``
- ``POST /projects/:id/ci/lint``

Auth: ``PRIVATE-TOKEN`` or ``JOB-TOKEN`` headers; unknown token -> 401, a ``reporter`` token -> 403
on variables and play, unknown project -> 404. Pipelines are simulated: every ``GET`` of a
pipeline advances its jobs one step along the DAG (created -> pending -> running -> result;
manual jobs wait in ``manual`` until played; ``always`` jobs run after failures).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MASKABLE = re.compile(r"^[A-Za-z0-9+/=@:.~_-]{8,}$")
TERMINAL = {"success", "failed", "skipped", "canceled"}


@dataclass
class JobSpec:
    """A job of the simulated pipeline."""

    name: str
    stage: str
    when: str = "on_success"  # on_success | manual | always
    needs: list[str] | None = None  # None: every job of the earlier stages
    result: str = "success"
    log: str = ""


@dataclass
class _Job:
    id: int
    spec: JobSpec
    status: str = "created"
    trace: str = ""


@dataclass
class _Pipeline:
    id: int
    ref: str
    variables: list[dict[str, str]]
    jobs: list[_Job]
    stages: list[str]
    status: str = "created"


@dataclass
class FakeGitLab:
    tokens: dict[str, str] = field(default_factory=lambda: {"good-token": "maintainer"})
    project_id: int = 42
    project_path: str = "etalab/albert"
    variables: list[dict[str, Any]] = field(default_factory=list)
    #: the jobs every new pipeline gets (in stage order)
    pipeline_jobs: list[JobSpec] = field(default_factory=list)
    pipelines: dict[int, _Pipeline] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    played: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 1000

    # --- server ---------------------------------------------------------------------------------
    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                lowered = {k.lower(): v for k, v in self.headers.items()}
                try:
                    status, payload, headers = fake.handle(self.command, self.path, lowered, body)
                except Exception as exc:  # a bug of the fake: answer it, do not hang the client
                    status, payload, headers = 500, {"message": f"fake gitlab: {exc!r}"}, {}
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                ctype = "text/plain" if isinstance(payload, bytes) else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- routing --------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes):
        """(status, JSON-able or bytes, extra headers) for one request; header names lowercase."""
        parts = urlsplit(raw_path)
        path, query = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.requests.append((method, path))
        token = headers.get("private-token") or headers.get("job-token")
        role = self.tokens.get(token or "")
        if role is None:
            return 401, {"message": "401 Unauthorized"}, {}
        match = re.match(r"^/api/v4/projects/([^/]+)(/.*)?$", path)
        if not match:
            return 404, {"error": "404 Not Found"}, {}
        project, rest = unquote(match.group(1)), match.group(2) or ""
        if project not in {str(self.project_id), self.project_path}:
            return 404, {"message": "404 Project Not Found"}, {}
        data = _parse_body(body, headers)
        with self._lock:
            return self._route(method, rest, query, data, role)

    def _route(self, method: str, rest: str, query: dict, data: dict, role: str):
        if rest == "" and method == "GET":
            return 200, {"id": self.project_id, "path_with_namespace": self.project_path}, {}
        if rest.startswith("/variables"):
            if role != "maintainer":
                return 403, {"message": "403 Forbidden"}, {}
            return self._variables(method, rest, query, data)
        if rest == "/pipeline" and method == "POST":
            return self._create_pipeline(data)
        m = re.match(r"^/pipelines/(\d+)(/jobs)?$", rest)
        if m and method == "GET":
            pipeline = self.pipelines.get(int(m.group(1)))
            if pipeline is None:
                return 404, {"message": "404 Not found"}, {}
            if m.group(2):
                return 200, [self._job_json(pipeline, j) for j in pipeline.jobs], {}
            self._advance(pipeline)
            return 200, self._pipeline_json(pipeline), {}
        m = re.match(r"^/jobs/(\d+)/(play|trace)$", rest)
        if m:
            found = self._find_job(int(m.group(1)))
            if found is None:
                return 404, {"message": "404 Not found"}, {}
            pipeline, job = found
            if m.group(2) == "trace" and method == "GET":
                return 200, job.trace.encode(), {}
            if m.group(2) == "play" and method == "POST":
                if role != "maintainer":
                    return 403, {"message": "403 Forbidden"}, {}
                if job.status != "manual":
                    return 400, {"message": "400 Bad request - Unplayable Job"}, {}
                job.status = "pending"
                self.played.append(job.spec.name)
                return 200, self._job_json(pipeline, job), {}
        if rest == "/ci/lint" and method == "POST":
            return 200, lint(data.get("content", "")), {}
        return 404, {"error": "404 Not Found"}, {}

    # --- variables ------------------------------------------------------------------------------
    def _variables(self, method: str, rest: str, query: dict, data: dict):
        if rest == "/variables" and method == "GET":
            return 200, [_public(v) for v in self.variables], {}
        if rest == "/variables" and method == "POST":
            scope = data.get("environment_scope", "*")
            if any(v["key"] == data.get("key") and v["environment_scope"] == scope
                   for v in self.variables):
                return 400, {"message": {"key": [f"({data['key']}) has already been taken"]}}, {}
            if data.get("masked") and not MASKABLE.match(str(data.get("value", ""))):
                return 400, {"message": {"value": ["is invalid"]}}, {}
            var = {"key": data["key"], "value": data["value"], "environment_scope": scope,
                   "variable_type": data.get("variable_type", "env_var"),
                   "protected": _bool(data.get("protected")), "masked": _bool(data.get("masked")),
                   "hidden": False, "raw": _bool(data.get("raw")),
                   "description": data.get("description")}
            self.variables.append(var)
            return 201, _public(var), {}
        m = re.match(r"^/variables/([^/]+)$", rest)
        if m and method == "PUT":
            key = unquote(m.group(1))
            scope = query.get("filter[environment_scope]")
            matches = [v for v in self.variables if v["key"] == key
                       and (scope is None or v["environment_scope"] == scope)]
            if not matches:
                return 404, {"message": "404 Variable Not Found"}, {}
            if len(matches) > 1:
                return 409, {"message": "There are multiple variables with provided parameters. "
                                        "Please use 'filter[environment_scope]'"}, {}
            var = matches[0]
            for k in ("value", "variable_type", "environment_scope", "description"):
                if k in data:
                    var[k] = data[k]
            for k in ("protected", "masked", "raw"):
                if k in data:
                    var[k] = _bool(data[k])
            return 200, _public(var), {}
        return 404, {"error": "404 Not Found"}, {}

    # --- pipelines ------------------------------------------------------------------------------
    def _create_pipeline(self, data: dict):
        if not data.get("ref"):
            return 400, {"message": "400 (Bad request) \"ref\" not given"}, {}
        if not self.pipeline_jobs:
            return 400, {"message": {"base": ["Pipeline will not run for the selected trigger. "
                                              "The rules configuration prevented any jobs from "
                                              "being added to the pipeline."]}}, {}
        pid = self._id()
        stages = list(dict.fromkeys(j.stage for j in self.pipeline_jobs))
        jobs = [_Job(self._id(), spec) for spec in self.pipeline_jobs]
        pipeline = _Pipeline(pid, data["ref"], data.get("variables") or [], jobs, stages)
        self.pipelines[pid] = pipeline
        return 201, self._pipeline_json(pipeline), {}

    def _advance(self, p: _Pipeline) -> None:
        """One step for every job, from the state at the start of the step."""
        before = {j.spec.name: j.status for j in p.jobs}
        for job in p.jobs:
            status = before[job.spec.name]
            if status == "created":
                deps = job.spec.needs
                if deps is None:
                    rank = p.stages.index(job.spec.stage)
                    deps = [j.spec.name for j in p.jobs if p.stages.index(j.spec.stage) < rank]
                dep_status = [before[d] for d in deps if d in before]
                if not all(s in TERMINAL for s in dep_status):
                    continue
                ok = all(s == "success" for s in dep_status)
                if job.spec.when == "always":
                    job.status = "pending"
                elif not ok:
                    job.status = "skipped"
                else:
                    job.status = "manual" if job.spec.when == "manual" else "pending"
            elif status == "pending":
                job.status = "running"
                job.trace += f"Running job {job.spec.name} on fake runner\n"
            elif status == "running":
                job.trace += job.spec.log
                job.status = job.spec.result
                job.trace += ("Job succeeded\n" if job.spec.result == "success"
                              else "ERROR: Job failed: exit code 1\n")
        statuses = [j.status for j in p.jobs]
        if any(s in {"pending", "running"} for s in statuses):
            p.status = "running"
        elif all(s in TERMINAL for s in statuses):
            p.status = "failed" if "failed" in statuses else "success"
        elif "manual" in statuses:
            p.status = "manual"
        else:
            p.status = "running"

    def _find_job(self, jid: int):
        for pipeline in self.pipelines.values():
            for job in pipeline.jobs:
                if job.id == jid:
                    return pipeline, job
        return None

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _pipeline_json(self, p: _Pipeline) -> dict:
        return {"id": p.id, "iid": p.id - 1000, "project_id": self.project_id, "status": p.status,
                "ref": p.ref, "sha": "0" * 40, "source": "api",
                "web_url": f"{self.url}/{self.project_path}/-/pipelines/{p.id}"}

    def _job_json(self, p: _Pipeline, j: _Job) -> dict:
        return {"id": j.id, "name": j.spec.name, "stage": j.spec.stage, "status": j.status,
                "ref": p.ref, "allow_failure": False, "when": j.spec.when,
                "pipeline": {"id": p.id, "project_id": self.project_id, "ref": p.ref,
                             "status": p.status},
                "web_url": f"{self.url}/{self.project_path}/-/jobs/{j.id}"}


def lint(content: str) -> dict:
    """What /ci/lint answers, for the checks GitLab does that a schema cannot: stages, needs."""
    errors: list[str] = []
    try:
        doc = yaml.load(content, Loader=_LintLoader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError as exc:
        return {"valid": False, "errors": [f"Invalid configuration format: {exc}"], "warnings": [],
                "merged_yaml": None, "includes": []}
    doc = doc if isinstance(doc, dict) else {}
    stages = [".pre", *doc.get("stages", ["build", "test", "deploy"]), ".post"]
    jobs = {k: v for k, v in doc.items() if isinstance(v, dict) and not k.startswith(".")
            and k not in {"workflow", "variables", "default", "include"}}
    for name, job in jobs.items():
        stage = job.get("stage", "test")
        if stage not in stages and "extends" not in job:
            errors.append(f"{name} job: chosen stage {stage} does not exist; available stages "
                          f"are {', '.join(stages)}")
        for need in job.get("needs") or []:
            need_name = need["job"] if isinstance(need, dict) else need
            if need_name not in jobs:
                errors.append(f"jobs:{name}:needs config ... {need_name!r} does not exist")
    return {"valid": not errors, "errors": errors, "warnings": [],
            "merged_yaml": content if not errors else None, "includes": []}


class _LintLoader(yaml.SafeLoader):
    pass


_LintLoader.add_constructor("!reference", lambda loader, node: loader.construct_sequence(node))


def _public(var: dict) -> dict:
    out = dict(var)
    if out.get("hidden"):
        out["value"] = None
    return out


def _bool(value: Any) -> bool:
    return value in (True, "true", "True", 1, "1")


def _parse_body(body: bytes, headers: dict[str, str]) -> dict:
    if not body:
        return {}
    if "json" in headers.get("content-type", ""):
        return json.loads(body)
    return {k: v[-1] for k, v in parse_qs(body.decode()).items()}


def serve(monkeypatch, **kwargs: Any):
    """Start a FakeGitLab and point the ci/ helpers at it (GITLAB_URL, GITLAB_TOKEN, CI_PROJECT_ID)."""
    fake = FakeGitLab(**kwargs)
    url = fake.start()
    for name in ("CI_SERVER_URL", "CI_JOB_TOKEN", "ALBERT_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GITLAB_URL", url)
    monkeypatch.setenv("GITLAB_TOKEN", "good-token")
    monkeypatch.setenv("CI_PROJECT_ID", str(fake.project_id))
    return fake
