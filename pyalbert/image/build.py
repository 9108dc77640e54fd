"""Build and push baked images: probe, then act. The one module here that runs commands.

``build_image`` runs the preflight, asks Docker for the recipe label of the target tag and builds
only when it differs; ``push_image`` logs in with ``$REGISTRY_USER``/``$REGISTRY_TOKEN`` (token on
stdin, in a throwaway ``DOCKER_CONFIG`` so no credential stays on the machine), tags and pushes.
Both take a runner (:class:`~pyalbert.remote.LocalRunner`, or a dry runner) and a ``say``
callback for progress lines.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pyalbert.commands.base import Cmd, Secret
from pyalbert.config.spec import DeploymentSpec
from pyalbert.errors import AlbertError
from pyalbert.image import commands
from pyalbert.image.preflight import Estimate, estimate, load_metadata
from pyalbert.image.recipe import ImageRecipe, model_dir
from pyalbert.remote import LocalRunner, Runner

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class Outcome:
    ref: str
    changed: bool
    reason: str
    commands: list[Cmd] = field(default_factory=list)


def target_gpu_memory_gb(spec: DeploymentSpec, model_id: str) -> float | None:
    """GPU memory (GiB) of the smallest GPU host that may run ``model_id``, None without GPUs."""
    names = spec.env.placement_hosts(model_id)
    hosts = [h for h in spec.env.hosts_for("vllm") if not names or h.name in names]
    sizes = [h.gpu_memory_gb for h in hosts if h.gpus and h.gpu_memory_gb]
    return min(sizes) if sizes else None


def preflight(spec: DeploymentSpec, recipe: ImageRecipe, *, gpu_memory_gb: float | None = None,
              strict: bool = True) -> tuple[Estimate | None, str]:
    """(estimate, "") from local metadata, or (None, why it was skipped).

    ``strict`` raises :class:`~pyalbert.image.preflight.PreflightError` when it won't fit;
    ``albert config check`` passes ``strict=False`` and reads ``estimate.fits``.
    """
    source = recipe.weights_dir or model_dir(spec, recipe.model_id)
    memory = gpu_memory_gb or target_gpu_memory_gb(spec, recipe.model_id)
    if memory is None:
        return None, (f"preflight skipped: no GPU memory known for {recipe.model_id} (set "
                      "gpu_memory_gb on the hosts or pass --gpu-memory-gb)")
    metadata = load_metadata(source)
    if metadata is None:
        return None, f"preflight skipped: no config.json in {source} (download the model first)"
    model = recipe.model
    result = estimate(
        metadata, gpu_memory_gb=memory, gpu_memory_utilization=model.gpu_mem_use,
        # a model split over a group: weights and KV cache spread over every GPU (TP x PP)
        tensor_parallel_size=model.tensor_parallel_size * model.pipeline_parallel_size,
        max_model_len=model.max_model_len,
        quantization=model.quantization, extra_args=[*spec.env.vllm.extra_args, *model.extra_args],
        model=recipe.model_id,
    )
    return (result.check() if strict else result), ""


def preflight_model(spec: DeploymentSpec, model_id: str, *, gpu_memory_gb: float | None = None,
                    strict: bool = False) -> tuple[Estimate | None, str]:
    """Preflight of one routing-table model from the storage dir's metadata (no network)."""
    from pyalbert.image.recipe import recipe

    return preflight(spec, recipe(spec, model_id), gpu_memory_gb=gpu_memory_gb, strict=strict)


def build_image(
    spec: DeploymentSpec,
    recipe: ImageRecipe,
    *,
    ref: str | None = None,
    runner: Runner | None = None,
    dry_run: bool = False,
    force: bool = False,
    gpu_memory_gb: float | None = None,
    say: Say = _quiet,
) -> Outcome:
    ref = ref or recipe.default_ref
    result, skipped = preflight(spec, recipe, gpu_memory_gb=gpu_memory_gb)
    say(result.summary() if result else skipped)
    runner = runner or LocalRunner()
    digest = recipe.digest()
    if not force:
        probe = runner.run(commands.recipe_label(ref), check=False)
        if probe.ok and probe.stdout.strip() == digest:
            return Outcome(ref, False, f"{ref} is up to date (recipe {digest}): nothing to build")
    cmd = commands.build(ref, recipe.dockerfile(), recipe_digest=digest,
                         context=str(recipe.weights_dir) if recipe.weights_dir else None)
    if dry_run:
        return Outcome(ref, True, f"would build {ref} (recipe {digest})", [cmd])
    say(f"building {ref} FROM {recipe.base}"
        + (f" with the weights of {recipe.weights_dir}" if recipe.weights_dir else ""))
    runner.run(cmd)
    return Outcome(ref, True, f"built {ref} (recipe {digest})", [cmd])


@dataclass(frozen=True)
class Registry:
    """An OCI registry address: ``host[:port][/namespace]``, with or without a scheme."""

    host: str
    namespace: str = ""

    @classmethod
    def parse(cls, url: str) -> Registry:
        text = url if "://" in url else f"//{url}"
        parts = urlsplit(text)
        if not parts.netloc or parts.query or parts.fragment:
            raise AlbertError(
                f"--registry {url!r} is not a registry address. Fix: give host[:port][/namespace], "
                "e.g. registry.gitlab.com/group/project or 127.0.0.1:5000."
            )
        return cls(parts.netloc, parts.path.strip("/"))

    def ref(self, repository: str, version: str) -> str:
        prefix = f"{self.host}/{self.namespace}" if self.namespace else self.host
        return f"{prefix}/{repository}:{version}"


def registry_credentials(environ: Mapping[str, str] | None = None) -> tuple[str, Secret] | None:
    """``($REGISTRY_USER, $REGISTRY_TOKEN)``; None when no token is set (use docker's own login)."""
    environ = os.environ if environ is None else environ
    token = environ.get("REGISTRY_TOKEN", "")
    if not token:
        return None
    user = environ.get("REGISTRY_USER", "")
    if not user:
        raise AlbertError(
            "REGISTRY_TOKEN is set but REGISTRY_USER is not. Fix: set REGISTRY_USER to the user "
            "the token belongs to (GitLab: gitlab-ci-token with $CI_JOB_TOKEN; cloud registries: "
            "see their docs, e.g. 'iam' or 'oauth')."
        )
    return user, Secret(token)


def push_plan(local_ref: str, registry: Registry, remote_ref: str,
              credentials: tuple[str, Secret] | None) -> list[Cmd]:
    """The commands of a push, in order (login only with credentials)."""
    steps = []
    if credentials:
        steps.append(commands.login(registry.host, credentials[0], credentials[1]))
    steps += [commands.tag(local_ref, remote_ref), commands.push(remote_ref)]
    return steps


def push_image(
    local_ref: str,
    registry: Registry,
    *,
    remote_ref: str,
    environ: Mapping[str, str] | None = None,
    dry_run: bool = False,
    say: Say = _quiet,
) -> Outcome:
    credentials = registry_credentials(environ)
    steps = push_plan(local_ref, registry, remote_ref, credentials)
    if dry_run:
        return Outcome(remote_ref, True, f"would push {local_ref} as {remote_ref}", steps)
    say(f"logging in to {registry.host} as {credentials[0]}" if credentials else
        f"REGISTRY_TOKEN unset: pushing to {registry.host} with docker's existing credentials")
    with tempfile.TemporaryDirectory(prefix="albert-docker-config-") as config:
        env = {"DOCKER_CONFIG": config} if credentials else {}
        runner = LocalRunner(env=env)
        if not runner.run(Cmd.of("docker", "image", "inspect", local_ref), check=False).ok:
            raise AlbertError(
                f"no local image {local_ref}. Fix: build it first (albert image build ...) or "
                "pass the right --tag."
            )
        for cmd in steps:
            say(cmd.display())
            runner.run(cmd)
        digests = runner.run(commands.repo_digest(remote_ref), check=False).stdout.strip()
    return Outcome(remote_ref, True, f"pushed {remote_ref} {digests}".strip(), steps)


def registry_for(spec: DeploymentSpec | None, registry: str | None) -> Registry:
    value = registry or (spec.env.registry if spec else None)
    if not value:
        raise AlbertError(
            "no registry to push to. Fix: pass --registry host[:port][/namespace], or set "
            "'registry' in the environment file."
        )
    return Registry.parse(value)

