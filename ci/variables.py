"""``python -m ci.variables check|sync|docs``: the project's CI/CD variables against the config.

- ``check --env staging``: every variable the jobs need in that environment scope, compared with
  the project's; prints what is missing, wrongly scoped or wrongly flagged; exit 1 if any.
- ``sync --from FILE``: create or update them from a file (never printed); says what is unchanged.
  FILE (YAML, TOML or JSON) maps an environment to its values; a value is a string or
  ``{file = "path"}`` to read it from a local file (SSH keys)::

      [staging]
      HF_TOKEN = "hf_..."
      SSH_PRIVATE_KEY = { file = "~/.ssh/albert_staging" }

- ``docs``: writes ``docs/ci-variables.md`` (``--check``: fail if it is not current).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ci import gitlab as gl
from ci import pipeline_file
from ci.requirements import VariableSpec, maskable, required_variables
from pyalbert.config import find_config_dir, load_spec
from pyalbert.config.loader import read_document
from pyalbert.errors import AlbertError
from pyalbert.ui import console, console_err

DOCS = pipeline_file.REPO / "docs" / "ci-variables.md"


# --- pure: compare ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    key: str
    scope: str
    status: str  # "ok", "missing", "optional", "wrong scope", "wrong flags"
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in {"missing", "wrong scope", "wrong flags"}


def _scope_matches(scope: str, env: str) -> bool:
    return scope == env or fnmatch.fnmatchcase(env, scope)


def check(required: Iterable[VariableSpec], existing: Sequence[Mapping[str, Any]]) -> list[Finding]:
    """Compare the variables needed with the project's (GitLab API dicts)."""
    findings = []
    for need in required:
        same_key = [v for v in existing if v["key"] == need.key]
        visible = [v for v in same_key if _scope_matches(v.get("environment_scope", "*"), need.scope)]
        if not visible:
            others = sorted({v.get("environment_scope", "*") for v in same_key})
            if others:
                findings.append(Finding(need.key, need.scope, "wrong scope",
                                        f"defined for {', '.join(others)}, not for {need.scope}"))
            elif need.required:
                findings.append(Finding(need.key, need.scope, "missing", need.description))
            else:
                findings.append(Finding(need.key, need.scope, "optional", "not set (optional)"))
            continue
        # the most specific definition wins in GitLab: an exact scope over a wildcard
        var = sorted(visible, key=lambda v: v.get("environment_scope", "*") != need.scope)[0]
        problems = []
        if need.secret and need.protected and var.get("environment_scope", "*") == "*":
            findings.append(Finding(need.key, need.scope, "wrong scope",
                                    f"scope '*' shares this {need.scope} secret with every "
                                    f"environment; scope it to {need.scope}"))
            continue
        if (need.protected or need.secret) and not var.get("protected"):
            problems.append("must be protected")
        if need.masked and not (var.get("masked") or var.get("hidden")):
            problems.append("must be masked")
        if var.get("variable_type", "env_var") != need.variable_type:
            problems.append(f"must be of type {need.variable_type!r}, not {var.get('variable_type')!r}")
        if problems:
            findings.append(Finding(need.key, need.scope, "wrong flags", "; ".join(problems)))
        else:
            findings.append(Finding(need.key, need.scope, "ok"))
    return findings


def unprotected_secrets(required: Iterable[VariableSpec], findings: Iterable[Finding]) -> dict[str, list[str]]:
    """``{scope: [keys]}`` of the secrets the findings say are not protected."""
    secret = {(v.key, v.scope) for v in required if v.secret}
    out: dict[str, list[str]] = {}
    for f in findings:
        if (f.key, f.scope) in secret and "must be protected" in f.detail:
            out.setdefault(f.scope, []).append(f.key)
    return out


# --- pure: sync plan ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    action: str  # "create", "update", "unchanged"
    key: str
    scope: str
    data: dict[str, Any] = field(repr=False, default_factory=dict)
    why: str = ""


def payload(need: VariableSpec, value: str) -> dict[str, Any]:
    return {
        "key": need.key,
        "value": value,
        "environment_scope": need.scope,
        "variable_type": need.variable_type,
        "protected": need.protected,
        "masked": need.masked,
        "raw": True,
        "description": need.description[:255],
    }


def plan_sync(
    required: Iterable[VariableSpec],
    values: Mapping[tuple[str, str], str],
    existing: Sequence[Mapping[str, Any]],
) -> list[Change]:
    """What to create or update so the project holds ``values`` with the flags of ``required``."""
    changes = []
    for need in required:
        value = values.get((need.key, need.scope))
        if value is None:
            continue
        data = payload(need, value)
        current = next((v for v in existing if v["key"] == need.key
                        and v.get("environment_scope", "*") == need.scope), None)
        if current is None:
            changes.append(Change("create", need.key, need.scope, data, "new"))
            continue
        differs = [k for k in ("value", "variable_type", "protected", "masked", "raw")
                   if current.get(k) != data[k]]
        if current.get("value") is None:  # hidden variables never show their value
            differs = sorted({*differs} - {"value"} | {"value (hidden)"})
        if differs:
            changes.append(Change("update", need.key, need.scope, data, ", ".join(differs)))
        else:
            changes.append(Change("unchanged", need.key, need.scope))
    return changes


def read_values(path: Path, required: Sequence[VariableSpec]) -> dict[tuple[str, str], str]:
    """``{env: {KEY: value | {file: path}}}`` -> {(key, scope): value}; unknown keys are errors."""
    data = read_document(path)
    known = {(v.key, v.scope) for v in required}
    scopes = {v.scope for v in required}
    if not isinstance(data, dict):
        raise AlbertError(f"{path}: expected a table per environment ({', '.join(sorted(scopes))}).")
    out: dict[tuple[str, str], str] = {}
    for scope, table in data.items():
        if scope not in scopes:
            raise AlbertError(f"{path}: environment {scope!r} is not one the pipeline deploys. "
                              f"Fix: use one of {', '.join(sorted(scopes))}.")
        for key, value in (table or {}).items():
            if (key, scope) not in known:
                names = ", ".join(sorted(k for k, s in known if s == scope))
                raise AlbertError(f"{path}: key {scope}.{key} is no variable the jobs read. "
                                  f"Fix: remove it or use one of {names}.")
            if isinstance(value, dict) and set(value) == {"file"}:
                source = Path(str(value["file"])).expanduser()
                try:
                    value = source.read_text()
                except OSError as exc:
                    raise AlbertError(f"{path}: {scope}.{key} names the file {source}, which "
                                      f"cannot be read ({exc.strerror}).") from None
            if not isinstance(value, str):
                raise AlbertError(f"{path}: {scope}.{key} must be a string or {{file = \"path\"}}.")
            need = next(v for v in required if v.key == key and v.scope == scope)
            if need.masked and not maskable(value):
                raise AlbertError(
                    f"{path}: {scope}.{key} must be masked but GitLab cannot mask this value. Fix: "
                    "use a single line of 8+ characters from A-Z a-z 0-9 + / = @ : . ~ _ -.")
            out[(key, scope)] = value
    return out


# --- docs ---------------------------------------------------------------------------------------
def render_docs(by_env: Mapping[str, list[VariableSpec]], pipeline_vars: Mapping[str, dict]) -> str:
    lines = [
        "# CI/CD variables",
        "",
        "Generated by `python -m ci.variables docs` from `config/environments/*.toml` and the",
        "workflow rules of `.gitlab-ci.yml`; do not edit by hand. Check a project with",
        "`python -m ci.variables check --env ENV`, set values with `python -m ci.variables sync --from FILE`.",
        "",
        "Each variable is scoped to its environment: GitLab gives it only to jobs whose",
        "`environment:name` matches, which every job that reaches the hosts declares.",
        "",
        "Secrets are **protected** in every environment (and everything in production): GitLab",
        "gives a protected variable only to pipelines of protected branches and tags. Unprotected,",
        "any branch could add a job with `environment: staging` and read staging's SSH key and",
        "tokens. So protect the `staging` branch (and `main`) in Settings > Repository > Protected",
        "branches, with who may push and merge restricted: its deploy jobs see the secrets only",
        "then. `check` fails on a secret that is not protected.",
        "",
    ]
    for env, needs in by_env.items():
        lines += [f"## `{env}`", ""]
        rule = pipeline_vars.get(env, {})
        if rule:
            lines += ["Set by the pipeline's workflow rules: "
                      + ", ".join(f"`{k}={v}`" for k, v in sorted(rule.items())
                                  if k != "ALBERT_PIPELINE_NAME") + ".", ""]
        lines += ["| Variable | Type | Protected | Masked | Required | From | What |",
                  "|---|---|---|---|---|---|---|"]
        for v in needs:
            yes = {True: "yes", False: "no"}
            lines.append(f"| `{v.key}` | {v.variable_type} | {yes[v.protected]} | {yes[v.masked]} "
                         f"| {yes[v.required]} | {v.source} | {v.description} |")
        lines.append("")
    return "\n".join(lines)


def docs_text(config_dir: Path | None = None) -> str:
    doc = pipeline_file.load()
    envs = pipeline_file.environments(doc)
    config_dir = config_dir or pipeline_file.REPO / "config"
    by_env = {env: required_variables(load_spec(env, config_dir)) for env in envs}
    return render_docs(by_env, envs)


# --- commands -----------------------------------------------------------------------------------
def _environments(args: argparse.Namespace) -> list[str]:
    return args.env or list(pipeline_file.environments(pipeline_file.load()))


def _required(args: argparse.Namespace) -> list[VariableSpec]:
    out: list[VariableSpec] = []
    for env in _environments(args):
        out += required_variables(load_spec(env, args.config_dir))
    return out


def _existing(settings: gl.Settings) -> list[dict[str, Any]]:
    project = gl.connect(settings)
    with gl.gitlab_errors(settings, "list the project's CI/CD variables"):
        return [v.asdict() for v in project.variables.list(get_all=True)]


def cmd_check(args: argparse.Namespace) -> int:
    required = _required(args)
    settings = gl.settings_from(args)
    findings = check(required, _existing(settings))
    from rich.table import Table

    table = Table("variable", "scope", "type", "protected", "masked", "status", "detail",
                  title=f"CI/CD variables of project {settings.project}")
    flags = {(v.key, v.scope): v for v in required}
    style = {"ok": "green", "optional": "yellow"}
    for f in findings:
        need = flags[(f.key, f.scope)]
        table.add_row(f.key, f.scope, need.variable_type, "yes" if need.protected else "no",
                      "yes" if need.masked else "no",
                      f"[{style.get(f.status, 'red')}]{f.status}[/]", f.detail)
    console.print(table)
    failed = [f for f in findings if f.failed]
    if failed:
        console_err.print(f"[red]{len(failed)} variable(s) to fix[/]: "
                          + ", ".join(f"{f.key} ({f.scope}: {f.status})" for f in failed)
                          + ". Fix: python -m ci.variables sync --from FILE, or the project's "
                            "Settings > CI/CD > Variables.")
        for scope, keys in unprotected_secrets(required, findings).items():
            console_err.print(
                f"{', '.join(keys)} hold secrets and must be protected: unprotected, any branch can "
                f"add a job with `environment: {scope}` and read them. Protected variables reach "
                f"only pipelines of protected branches: protect the `{scope}` branch too (Settings "
                "> Repository > Protected branches).", soft_wrap=True)
        return 1
    console.print("all required variables are set")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    required = _required(args)
    values = read_values(args.from_file, required)
    settings = gl.settings_from(args)
    changes = plan_sync(required, values, _existing(settings))
    project = gl.connect(settings)
    for change in changes:
        label = f"{change.key} ({change.scope})"
        if change.action == "unchanged":
            console.print(f"  unchanged  {label}")
            continue
        if args.dry_run:
            console.print(f"  would {change.action}  {label}: {change.why}")
            continue
        with gl.gitlab_errors(settings, f"{change.action} the variable {label}"):
            if change.action == "create":
                project.variables.create(change.data)
            else:
                project.variables.update(change.key, change.data,
                                         query_data={"filter[environment_scope]": change.scope})
        console.print(f"  {change.action}d  {label}: {change.why}")
    done = sum(c.action != "unchanged" for c in changes)
    console.print(f"{done} changed, {len(changes) - done} unchanged"
                  + (" (dry run)" if args.dry_run else ""))
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    text = docs_text(args.config_dir)
    if args.check:
        if not DOCS.is_file() or DOCS.read_text() != text:
            console_err.print(f"{DOCS.relative_to(pipeline_file.REPO)} is not current. "
                              "Fix: python -m ci.variables docs")
            return 1
        console.print("docs/ci-variables.md is current")
        return 0
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    if DOCS.is_file() and DOCS.read_text() == text:
        console.print("docs/ci-variables.md unchanged")
    else:
        DOCS.write_text(text)
        console.print("wrote docs/ci-variables.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ci.variables", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("check", cmd_check, "compare the project's variables with the config"),
                             ("sync", cmd_sync, "create/update variables from a file"),
                             ("docs", cmd_docs, "write docs/ci-variables.md")):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
        p.add_argument("--config-dir", type=Path, default=None,
                       help=f"config folder (default: {find_config_dir()})")
        if name == "docs":
            p.add_argument("--check", action="store_true", help="fail if the file is not current")
            continue
        p.add_argument("--env", "-e", action="append",
                       help="environment scope (repeatable; default: every environment the pipeline deploys)")
        gl.add_arguments(p)
        if name == "sync":
            p.add_argument("--from", dest="from_file", type=Path, required=True, help="values file")
            p.add_argument("--dry-run", action="store_true", help="say what would change")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return gl.run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
