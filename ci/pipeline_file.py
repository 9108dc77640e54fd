"""Read ``.gitlab-ci.yml`` as data: the environments its workflow rules select, its jobs.

GitLab's ``!reference`` tag is kept as a :class:`Reference` so the file loads with PyYAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILE = REPO / ".gitlab-ci.yml"
#: top-level keys that are not jobs
RESERVED = {"stages", "workflow", "variables", "default", "include", "image", "services",
            "cache", "before_script", "after_script"}


@dataclass(frozen=True)
class Reference:
    """``!reference [.hidden, key]``"""

    path: tuple[str, ...]


class _Loader(yaml.SafeLoader):
    pass


def _reference(loader: yaml.SafeLoader, node: yaml.Node) -> Reference:
    return Reference(tuple(loader.construct_sequence(node)))


_Loader.add_constructor("!reference", _reference)


def load(path: Path = PIPELINE_FILE) -> dict[str, Any]:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (SafeLoader)


def jobs(doc: dict[str, Any], *, hidden: bool = False) -> dict[str, dict[str, Any]]:
    """Jobs of the file (``hidden=True``: the ``.templates`` instead)."""
    return {
        name: body
        for name, body in doc.items()
        if name not in RESERVED and isinstance(body, dict) and name.startswith(".") == hidden
    }


def environments(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``ALBERT_ENV`` value -> the variables its workflow rule sets (the deploy environments)."""
    out: dict[str, dict[str, str]] = {}
    for rule in doc.get("workflow", {}).get("rules", []):
        variables = rule.get("variables") or {}
        if "ALBERT_ENV" in variables:
            out[variables["ALBERT_ENV"]] = {k: str(v) for k, v in variables.items()}
    return out


def branches(doc: dict[str, Any]) -> dict[str, str]:
    """branch -> ALBERT_ENV, from rules of the form ``$CI_COMMIT_BRANCH == "name"``."""
    out = {}
    for rule in doc.get("workflow", {}).get("rules", []):
        cond, variables = rule.get("if", ""), rule.get("variables") or {}
        if cond.startswith("$CI_COMMIT_BRANCH ==") and "ALBERT_ENV" in variables:
            out[cond.split("==", 1)[1].strip().strip('"')] = variables["ALBERT_ENV"]
    return out
