"""Docker commands for baked images: pure builders returning :class:`Cmd`.

The Dockerfile goes on standard input (``--file -``), so nothing is written next to the weights;
the registry token goes on standard input too (``--password-stdin``), never in argv.
"""

from __future__ import annotations

from pyalbert.commands.base import Cmd, Secret

#: the label holding :meth:`ImageRecipe.digest`: same value, same image, nothing to build
RECIPE_LABEL = "albert.recipe"


def build(ref: str, dockerfile: str, *, context: str | None, recipe_digest: str,
          pull: bool = False) -> Cmd:
    """``docker build`` of ``ref``; ``context`` None builds with no context (hub weights)."""
    return Cmd.of(
        "docker", "build",
        "--tag", ref,
        "--label", f"{RECIPE_LABEL}={recipe_digest}",
        ("--pull" if pull else None),
        ["--file", "-", context] if context else "-",
        stdin=dockerfile,
    )


def recipe_label(ref: str) -> Cmd:
    """Probe: prints the recipe digest of ``ref``; fails when there is no such image."""
    return Cmd.of("docker", "image", "inspect", "--format",
                  f'{{{{ index .Config.Labels "{RECIPE_LABEL}" }}}}', ref)


def login(registry: str, user: str, token: Secret) -> Cmd:
    return Cmd.of("docker", "login", "--username", user, "--password-stdin", registry, stdin=token)


def logout(registry: str) -> Cmd:
    return Cmd.of("docker", "logout", registry)


def tag(source: str, target: str) -> Cmd:
    return Cmd.of("docker", "tag", source, target)


def push(ref: str) -> Cmd:
    return Cmd.of("docker", "push", ref)


def pull(ref: str) -> Cmd:
    return Cmd.of("docker", "pull", ref)


def repo_digest(ref: str) -> Cmd:
    """Probe: the registry digests (``name@sha256:...``) known for ``ref``."""
    return Cmd.of("docker", "image", "inspect", "--format", "{{ json .RepoDigests }}", ref)
