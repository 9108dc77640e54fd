"""The test command works wherever the repository is cloned: a slice of the suite from /tmp.

Namespace hosts mount their own /tmp, so a path inside a checkout under /tmp that a test hands to a
host (``bash <checkout>/utils/init_vm.sh``, a ``.pth`` into ``tests/support``) used to vanish
there. This copies the working tree (tracked and new files, as a clone would have them after a
commit) under /tmp, installs it as a new user would (``scripts/bootstrap``, its own venv), and runs
the tests that used to fail from such a clone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: the tests that failed from a clone under /tmp (issue 19), one per way a path reaches a host
SLICE = [
    "tests/integration/test_provision.py::test_missing_variables_fail_before_any_change",
    "tests/integration/test_deploy.py::test_crashing_server_fails_fast_with_its_log_lines[venv]",
]


def copy_worktree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


@pytest.fixture
def clone_under_tmp():
    dest = Path(tempfile.mkdtemp(prefix="albert-clone-", dir="/tmp"))
    dest.chmod(0o755)  # hosts' users read the fake vLLM from it, as from any clone
    try:
        copy_worktree(dest)
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_the_suite_passes_from_a_clone_under_tmp(clone_under_tmp):
    clone = clone_under_tmp
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SSH_"))}
    env.update(ALBERT_SKIP_VLLM="1")
    boot = subprocess.run(["./scripts/bootstrap"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900)
    assert boot.returncode == 0, boot.stdout[-2000:] + boot.stderr[-2000:]
    run = subprocess.run(
        [str(clone / ".venv/bin/python"), "-m", "pytest", *SLICE, "-q",
         "-p", "no:cacheprovider"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) == len(SLICE), out[-2000:]
    # and it really ran the clone's code, not this checkout's
    where = subprocess.run([str(clone / ".venv/bin/python"), "-c",
                            "import pyalbert; print(pyalbert.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(clone))
