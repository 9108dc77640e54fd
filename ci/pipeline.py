"""``python -m ci.pipeline run --ref staging [--deploy] [--wait]``.

Triggers a pipeline on the ref, optionally presses the deploy button (plays every manual job of
the ``deploy`` stage once it is playable), follows job statuses and traces, and exits with the
pipeline's result: 0 success, 1 failed or canceled, 2 timeout. Without ``--deploy`` a pipeline
waiting on the deploy button ends the wait with 0 and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ci import gitlab as gl
from pyalbert.errors import AlbertError
from pyalbert.ui import console_err

FINAL = {"success", "failed", "canceled", "skipped"}
TRACED = {"running", "success", "failed", "canceled"}
DEPLOY_STAGE = "deploy"


class PipelineTimeout(AlbertError):
    exit_code = 2


class Follower:
    """Polls one pipeline: prints status changes and new trace lines, plays deploy jobs."""

    def __init__(self, project, pipeline, *, deploy: bool, out: TextIO,
                 settings: gl.Settings):
        self.project, self.pipeline, self.deploy, self.out = project, pipeline, deploy, out
        self.settings = settings
        self.status: dict[int, str] = {}
        self.printed: dict[int, int] = {}
        self.finished_traces: set[int] = set()
        self.played: set[int] = set()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self) -> str:
        """One poll; returns the pipeline status."""
        with gl.gitlab_errors(self.settings, f"follow pipeline {self.pipeline.id}"):
            self.pipeline.refresh()
            jobs = sorted(self.pipeline.jobs.list(get_all=True), key=lambda j: j.id)
        for job in jobs:
            if self.status.get(job.id) != job.status:
                self.status[job.id] = job.status
                self.say(f"[{job.stage}] {job.name}: {job.status}")
            if job.status in TRACED and job.id not in self.finished_traces:
                self._trace(job)
            if (self.deploy and job.status == "manual" and job.stage == DEPLOY_STAGE
                    and job.id not in self.played):
                with gl.gitlab_errors(self.settings, f"play the manual job {job.name!r}"):
                    self.project.jobs.get(job.id, lazy=True).play()
                self.played.add(job.id)
                self.say(f"[{job.stage}] {job.name}: played")
        return self.pipeline.status

    def _trace(self, job) -> None:
        with gl.gitlab_errors(self.settings, f"read the log of job {job.name!r}"):
            raw = self.project.jobs.get(job.id, lazy=True).trace()
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        new = text[self.printed.get(job.id, 0):]
        self.printed[job.id] = len(text)
        for line in new.splitlines():
            self.say(f"{job.name} | {line}")
        if job.status in FINAL:
            self.finished_traces.add(job.id)


def follow(follower: Follower, *, interval: float, timeout: float,
           sleep: Callable[[float], Any] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
    deadline = clock() + timeout
    while True:
        played_before = len(follower.played)
        status = follower.step()
        if status in FINAL:
            follower.say(f"pipeline {follower.pipeline.id}: {status} {follower.pipeline.web_url}")
            return 0 if status in {"success", "skipped"} else 1
        if status == "manual" and len(follower.played) == played_before:
            waiting = [jid for jid, s in follower.status.items() if s == "manual"]
            if not follower.deploy or all(jid in follower.played for jid in waiting):
                follower.say(f"pipeline {follower.pipeline.id} waits for a manual job (the deploy "
                             f"button): {follower.pipeline.web_url}")
                return 0
        if clock() > deadline:
            raise PipelineTimeout(
                f"pipeline {follower.pipeline.id} is still {status} after {timeout:.0f} s: "
                f"{follower.pipeline.web_url}. Fix: look at it there, or rerun with a longer "
                f"--timeout.")
        sleep(interval)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    settings = gl.settings_from(args)
    project = gl.connect(settings)
    data: dict[str, Any] = {"ref": args.ref}
    if args.variable:
        pairs = (v.split("=", 1) for v in args.variable)
        data["variables"] = [{"key": key, "value": value} for key, value in pairs]
    with gl.gitlab_errors(settings, f"create a pipeline on {args.ref!r}"):
        pipeline = project.pipelines.create(data)
    out.write(f"pipeline {pipeline.id} on {args.ref}: {pipeline.status} {pipeline.web_url}\n")
    if not (args.wait or args.deploy):
        return 0
    follower = Follower(project, pipeline, deploy=args.deploy, out=out, settings=settings)
    return follow(follower, interval=args.interval, timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ci.pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="trigger a pipeline and follow it")
    p.add_argument("--ref", required=True, help="branch or tag (staging, main)")
    p.add_argument("--deploy", action="store_true", help="play the manual deploy jobs (implies --wait)")
    p.add_argument("--wait", action="store_true", help="follow jobs and traces until the end")
    p.add_argument("--variable", action="append", metavar="KEY=VALUE", help="pipeline variable")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    gl.add_arguments(p)
    p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for v in args.variable or []:
        if "=" not in v:
            console_err.print(f"[bold red]error:[/] --variable {v!r} is not KEY=VALUE")
            return 2
    return gl.run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
