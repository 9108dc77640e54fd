"""One connection to GitLab, and GitLab's failures turned into one-paragraph errors.

Settings come from the arguments, else from the variables GitLab sets in a job:
URL ``--url`` / ``GITLAB_URL`` / ``CI_SERVER_URL``; token ``GITLAB_TOKEN`` (a personal, project
or group access token) or ``CI_JOB_TOKEN`` (inside a job, limited rights); project ``--project``
(id or ``group/name``) / ``CI_PROJECT_ID``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import requests

from pyalbert.errors import AlbertError

TIMEOUT_S = 20


@dataclass(frozen=True)
class Settings:
    url: str
    project: str
    token: str
    token_kind: str  # "private" (GITLAB_TOKEN) or "job" (CI_JOB_TOKEN)

    @property
    def token_source(self) -> str:
        return "GITLAB_TOKEN" if self.token_kind == "private" else "CI_JOB_TOKEN"


def run_main(func, args: argparse.Namespace) -> int:
    """Run a ``python -m ci.*`` action through the project's one error/exit wrapper."""
    from pyalbert.entry import exit_code

    return exit_code(lambda: func(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="GitLab URL (default: $GITLAB_URL, $CI_SERVER_URL)")
    parser.add_argument("--project", help="project id or path (default: $CI_PROJECT_ID)")


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    url = getattr(args, "url", None) or env.get("GITLAB_URL") or env.get("CI_SERVER_URL")
    project = getattr(args, "project", None) or env.get("CI_PROJECT_ID")
    missing = []
    if not url:
        missing.append("the GitLab URL (--url, GITLAB_URL or CI_SERVER_URL)")
    if not project:
        missing.append("the project (--project or CI_PROJECT_ID)")
    if env.get("GITLAB_TOKEN"):
        token, kind = env["GITLAB_TOKEN"], "private"
    elif env.get("CI_JOB_TOKEN"):
        token, kind = env["CI_JOB_TOKEN"], "job"
    else:
        token, kind = "", ""
        missing.append("a token (GITLAB_TOKEN with the api scope, or CI_JOB_TOKEN inside a job)")
    if missing:
        raise AlbertError(
            "GitLab is not configured: missing " + "; ".join(missing) + ". Fix: export them "
            "(e.g. GITLAB_URL=https://gitlab.example.org GITLAB_TOKEN=... CI_PROJECT_ID=42)."
        )
    return Settings(url=url.rstrip("/"), project=str(project), token=token, token_kind=kind)


def connect(settings: Settings):
    """The python-gitlab project object (lazy: no request until it is used)."""
    import gitlab

    auth = {"private_token": settings.token} if settings.token_kind == "private" else {
        "job_token": settings.token
    }
    client = gitlab.Gitlab(settings.url, timeout=TIMEOUT_S, retry_transient_errors=False, **auth)
    return client.projects.get(settings.project, lazy=True)


def explain(exc: Exception, settings: Settings, action: str) -> AlbertError | None:
    """A one-paragraph error for a failed GitLab call, or None for a bug."""
    import gitlab.exceptions as gle

    where = f"{settings.url} (project {settings.project})"
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        gle.GitlabConnectionError)):
        return AlbertError(
            f"cannot reach GitLab at {settings.url} to {action}: {type(exc).__name__}. "
            "Fix: check GITLAB_URL / --url and that this machine can reach it."
        )
    if not isinstance(exc, gle.GitlabError):
        return None
    code = exc.response_code
    if code == 401 or isinstance(exc, gle.GitlabAuthenticationError):
        return AlbertError(
            f"GitLab {where} rejected the token from {settings.token_source} (401) while trying "
            f"to {action}. Fix: use a valid, unexpired token with the 'api' scope."
        )
    if code == 403:
        return AlbertError(
            f"the token from {settings.token_source} may not {action} on {where} (403). Fix: use "
            "a token of a Maintainer of the project (variables and manual deploys need it)."
        )
    if code == 404:
        return AlbertError(
            f"GitLab {where} answered 404 while trying to {action}: the project (or the object) "
            f"does not exist or the token cannot see it. Fix: check --project / CI_PROJECT_ID "
            f"and the token's access."
        )
    return AlbertError(f"GitLab {where} refused to {action} ({code}): {exc.error_message}.")


@contextmanager
def gitlab_errors(settings: Settings, action: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        error = explain(exc, settings, action)
        if error is None:
            raise
        raise error from None
