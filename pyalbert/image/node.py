"""``albert node spec``: the settings a managed GPU node needs to run a baked image.

Pure: a recipe (and, when hub metadata is on disk, a preflight estimate) in, a plain dict out,
printed as JSON or YAML. The node gets no arguments: port, health path and start timeout are the
image's own; resources come from ``tensor_parallel_size`` and the GPU memory the model needs.
"""

from __future__ import annotations

import json
import math

import yaml

from pyalbert.config.placement import slug
from pyalbert.image.preflight import Estimate, GiB
from pyalbert.image.recipe import HEALTH_PATH, PORT, ImageRecipe


def registry_secret_name(env: str) -> str:
    """Name of the platform secret holding the registry credentials (pull access)."""
    return f"albert-{env}-registry"


def node_spec(recipe: ImageRecipe, *, image: str, gpu_memory_gb: float | None = None,
              estimate: Estimate | None = None) -> dict:
    model = recipe.model
    resources: dict = {"gpus": model.tensor_parallel_size}
    if gpu_memory_gb:
        resources["gpu_memory_gb"] = gpu_memory_gb
    if estimate is not None:
        # vLLM takes gpu_mem_use of each GPU: the smallest GPU where that share is enough
        resources["min_gpu_memory_gb"] = math.ceil(
            estimate.needed_per_gpu / estimate.gpu_memory_utilization / GiB)
        resources["estimate"] = estimate.as_dict()
    return {
        "name": f"albert-{recipe.env}-{slug(recipe.model_id)}",
        "image": image,
        "port": PORT,
        "health": {"path": HEALTH_PATH, "start_timeout_s": recipe.start_period_s},
        "resources": resources,
        "registry_credentials_secret": registry_secret_name(recipe.env),
        "arguments": [],
        "model": {
            "id": recipe.model_id,
            "repo": model.model,
            "revision": recipe.revision,
            "weights": "baked" if recipe.baked else "hub",
            "max_model_len": model.max_model_len,
            "quantization": model.quantization,
        },
        "test": {"method": "GET", "path": "/v1/models", "expect": recipe.model_id},
        "alias": recipe.model_id,
    }


def dump(spec: dict, fmt: str = "json") -> str:
    if fmt == "yaml":
        return yaml.safe_dump(spec, sort_keys=False)
    return json.dumps(spec, indent=2) + "\n"
