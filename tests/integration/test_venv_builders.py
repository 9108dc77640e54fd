"""The venv runtime's install step, for real on this machine (creates a venv: ~30 s)."""

from __future__ import annotations

import sys

from pyalbert.commands import process
from pyalbert.remote import LocalRunner


def test_ensure_venv_is_check_then_act(tmp_path):
    venv = tmp_path / "venv"
    cmd = process.ensure_venv(sys.executable, str(venv), ["--no-index", "--no-deps", "nothing-here"],
                              cache_dir=str(tmp_path / "cache"), check_import="json")
    assert cmd.render().startswith(f"{venv}/bin/python -c 'import json' >/dev/null 2>&1 || {{ ")
    # the venv does not exist: the install branch runs (and fails on the fake requirement)
    first = LocalRunner().run(cmd, check=False, timeout=120)
    assert not first.ok and (venv / "bin" / "python").exists()
    # now the probe succeeds (json imports): nothing runs, nothing fails
    second = LocalRunner().run(cmd, timeout=60)
    assert second.ok and second.stdout == ""
