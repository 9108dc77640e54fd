"""``python -m ci.lint``: lint ``.gitlab-ci.yml`` through the project's CI lint API.

GitLab resolves includes, ``extends`` and ``!reference`` and checks ``needs`` the way a real
pipeline would (``--dry-run --ref staging`` simulates the pipeline of that branch).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ci import gitlab as gl
from ci.pipeline_file import PIPELINE_FILE
from pyalbert.errors import AlbertError
from pyalbert.ui import console, console_err


def lint(project, content: str, *, ref: str | None = None, dry_run: bool = False) -> dict:
    data: dict = {"content": content}
    if dry_run:
        data["dry_run"] = True
    if ref:
        data["ref"] = ref
    return project.ci_lint.create(data).asdict()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.lint", description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=PIPELINE_FILE)
    parser.add_argument("--ref", help="branch to simulate (with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="simulate the pipeline of --ref")
    gl.add_arguments(parser)
    args = parser.parse_args(argv)
    return gl.run_main(_lint_file, args)


def _lint_file(args: argparse.Namespace) -> int:
    try:
        content = args.file.read_text(encoding="utf-8")
    except OSError as exc:
        raise AlbertError(f"cannot read {args.file} ({exc.strerror}).") from None
    settings = gl.settings_from(args)
    project = gl.connect(settings)
    with gl.gitlab_errors(settings, "lint the CI configuration"):
        result = lint(project, content, ref=args.ref, dry_run=args.dry_run)
    for warning in result.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {warning}", markup=True, soft_wrap=True)
    if not result.get("valid"):
        for error in result.get("errors") or []:
            console_err.print(f"[red]error:[/] {error}", soft_wrap=True)
        console_err.print(f"{args.file.name} is invalid")
        return 1
    console.print(f"{args.file.name} is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
