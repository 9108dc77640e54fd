"""What a baked image holds, and its Dockerfile (``pyalbert/templates/image/Dockerfile.j2``).

A managed GPU node runs a registry image as is: no arguments, no mounted model. So one
routing-table entry becomes an :class:`ImageRecipe` (base image, the vLLM server arguments from
:func:`pyalbert.commands.vllm.server_args` with port 8000, environment, labels, where the weights
come from) and :func:`render_dockerfile` turns it into text. Pure: no Docker, no network.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from pyalbert.commands.vllm import server_args
from pyalbert.config.placement import slug
from pyalbert.config.routing import ModelSpec
from pyalbert.config.spec import DeploymentSpec, display_path
from pyalbert.errors import ConfigError, Problem

#: what managed nodes expect, and what ``albert node spec`` announces
PORT = 8000
HEALTH_PATH = "/health"
#: where baked weights live in the image
MODELS_DIR = "/models"
#: the upstream vllm/vllm-openai entrypoint, set explicitly: newer bases changed theirs
ENTRYPOINT = ("python3", "-m", "vllm.entrypoints.openai.api_server")
HEALTHCHECK = (
    "python3", "-c",
    f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{PORT}{HEALTH_PATH}', timeout=4)",
)
_TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "image"
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class ImageRecipe:
    env: str
    model_id: str
    model: ModelSpec
    base: str
    #: the model directory on this machine when the weights are baked, else None (hub download)
    weights_dir: Path | None
    revision: str
    command: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    start_period_s: int = 600

    @property
    def baked(self) -> bool:
        return self.weights_dir is not None

    @property
    def weights_path(self) -> str | None:
        return f"{MODELS_DIR}/{self.model_id}" if self.baked else None

    @property
    def repository(self) -> str:
        """``albert-<env>-vllm-<model slug>``: the image name, without registry or tag."""
        return f"albert-{self.env}-vllm-{slug(self.model_id)}"

    @property
    def version(self) -> str:
        """Tag: the revision (a commit is shortened to 12), ``-baked`` when weights are inside."""
        rev = self.revision[:12] if re.fullmatch(r"[0-9a-f]{40}", self.revision) else self.revision
        text = _TAG_UNSAFE.sub("-", rev).strip(".-") or "latest"
        return f"{text}-baked" if self.baked else text

    @property
    def default_ref(self) -> str:
        return f"{self.repository}:{self.version}"

    def dockerfile(self) -> str:
        return render_dockerfile(self)

    def digest(self) -> str:
        """Identifies what the image would contain (Dockerfile + weights' manifest), for probes."""
        h = hashlib.sha256(self.dockerfile().encode())
        if self.weights_dir is not None:
            manifest = self.weights_dir / ".albert-manifest.json"
            if manifest.is_file():
                h.update(manifest.read_bytes())
            else:  # no manifest: names and sizes of the files
                for path in sorted(p for p in self.weights_dir.rglob("*") if p.is_file()):
                    h.update(f"{path.relative_to(self.weights_dir)}:{path.stat().st_size}\n".encode())
        return h.hexdigest()[:16]


def _dquote(value: object) -> str:
    """A Dockerfile double-quoted word (ENV, LABEL): backslash, quote and ``$`` escaped."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{text}"'.replace("\n", "\\n")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["dquote"] = _dquote
    env.filters["json"] = lambda v: json.dumps(list(v) if isinstance(v, tuple) else v)
    return env


def render_dockerfile(recipe: ImageRecipe) -> str:
    return _environment().get_template("Dockerfile.j2").render(
        env=recipe.env,
        model_id=recipe.model_id,
        base=recipe.base,
        labels=recipe.labels,
        weights_path=recipe.weights_path,
        environment=recipe.environment,
        port=PORT,
        start_period_s=recipe.start_period_s,
        healthcheck=HEALTHCHECK,
        entrypoint=ENTRYPOINT,
        command=recipe.command,
    )


def model_dir(spec: DeploymentSpec, model_id: str) -> Path:
    return Path(spec.env.storage_dir) / model_id


def _installed_commit(weights_dir: Path) -> str | None:
    try:
        return str(json.loads((weights_dir / ".albert-manifest.json").read_text())["commit"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_of(spec: DeploymentSpec, model_id: str) -> ModelSpec:
    try:
        return spec.models[model_id]
    except KeyError:
        raise ConfigError(Problem(
            display_path(spec.routing_file), model_id, "no such model in the routing table",
            f"use one of: {', '.join(spec.models.ids())}",
        )) from None


def recipe(
    spec: DeploymentSpec,
    model_id: str,
    *,
    base: str | None = None,
    bake_weights: bool = False,
    weights_dir: Path | None = None,
) -> ImageRecipe:
    """The image for ``model_id`` of ``spec``'s routing table.

    With ``bake_weights`` the weights are copied from ``weights_dir`` (default: the storage dir's
    ``<storage_dir>/<model id>``, as ``albert models download`` leaves it) and served offline;
    else the server downloads ``model.model`` at ``model.revision`` on start.
    """
    model = model_of(spec, model_id)
    env = spec.env
    source = None
    if bake_weights:
        source = weights_dir or model_dir(spec, model_id)
        if not (source / "config.json").is_file():
            raise ConfigError(Problem(
                display_path(spec.env_file), "storage_dir",
                f"--bake-weights needs the model's files in {source}, which has no config.json",
                f"download it first (albert models download --env {env.name}), or point "
                "--weights-dir at a model directory",
            ))
    revision = (source and _installed_commit(source)) or model.revision or "main"
    hub_revision = ["--revision", model.revision] if (source is None and model.revision) else []
    path = f"{MODELS_DIR}/{model_id}" if source else model.model
    command = server_args(model_id, model, model_path=path, port=PORT, host="0.0.0.0",
                          extra_args=[*hub_revision, *env.vllm.extra_args])
    environment = {**env.vllm.env, **model.env}
    if source is not None:
        environment |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base = base or env.images.vllm
    labels = {
        "org.opencontainers.image.title": f"albert {model_id}",
        "org.opencontainers.image.description": (
            f"vLLM OpenAI server for {model.model}, port {PORT}, no arguments needed"),
        "org.opencontainers.image.source": f"https://huggingface.co/{model.model}",
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.base.name": base,
        "albert.env": env.name,
        "albert.model.id": model_id,
        "albert.model.repo": model.model,
        "albert.model.revision": revision,
        "albert.weights": "baked" if source else "hub",
        "albert.port": str(PORT),
        "albert.health": HEALTH_PATH,
    }
    return ImageRecipe(
        env=env.name, model_id=model_id, model=model, base=base, weights_dir=source,
        revision=revision, command=tuple(command), environment=environment, labels=labels,
        start_period_s=int(env.deploy.ready_timeout_s),
    )
