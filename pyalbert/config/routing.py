"""The routing table: ``llm_routing_table.json``, one entry per served model.

Keys are model ids (the name clients ask for, and the directory under the storage dir). The file
format is the original Albert one; ``tensor_parralel_size`` (sic) is still read, with a warning.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

#: A model id or hub repo id: ``name`` or ``org/name``, no spaces, no ``..``, no leading dot.
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
MODEL_ID_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Keys of old routing tables that meant something to the bash deploy scripts and nothing now.
LEGACY_IGNORED_KEYS = frozenset({"url", "is_local", "driver", "model_file", "force_download"})

Quantization = Literal["awq", "gptq", "fp8", "bitsandbytes", "gguf", "awq_marlin", "gptq_marlin"]


class LegacyKeyWarning(DeprecationWarning):
    """A routing table uses a key spelling that will stop working."""


def check_model_id(value: str, what: str = "model id") -> str:
    if not MODEL_ID_RE.match(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a valid {what}: use 'name' or 'org/name' with letters, digits, "
            "'.', '_' or '-' (no spaces, no '..', no leading dot or slash)"
        )
    return value


def derived_spare_port(port: int) -> int:
    """A model's spare port unless the routing table names one: 26000-31999, below Linux's
    ephemeral range (no outgoing connection holds it), apart from the api colours' band start."""
    return 26000 + port % 6000


class ModelSpec(BaseModel):
    """One routing-table entry: how to serve one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="hub repo id the weights come from")
    revision: str | None = Field(None, description="hub revision (commit sha, tag or branch) to pin")
    port: int = Field(ge=1024, le=65535, description="port the vLLM server listens on")
    spare_port: int | None = Field(
        None, ge=1024, le=32767,
        description="port of the new server started beside the old one during a replace without "
                    "downtime; default derived from port (26000 + port % 6000)")
    gpu_mem_use: float = Field(0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization")
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    #: stages of a model split over a host group (issue 17): TP x PP = the group's GPUs
    pipeline_parallel_size: int = Field(1, ge=1, le=64)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for vLLM")
    environments: tuple[str, ...] | None = Field(
        None, description="environments that serve this model (default: every environment)")
    quantization: Quantization | None = None
    max_model_len: int | None = Field(None, ge=16)
    replicas: int = Field(1, ge=1, le=64)
    extra_args: tuple[str, ...] = Field((), description="more vLLM server arguments")

    @property
    def replace_port(self) -> int:
        """Where the new server listens while the old one still serves (the spare slot)."""
        return self.spare_port or derived_spare_port(self.port)

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "tensor_parralel_size" in data:
            if "tensor_parallel_size" in data:
                raise ValueError(
                    "both 'tensor_parallel_size' and its legacy spelling 'tensor_parralel_size' "
                    "are set: keep only 'tensor_parallel_size'"
                )
            warnings.warn(
                "'tensor_parralel_size' is a legacy spelling: rename it 'tensor_parallel_size'",
                LegacyKeyWarning,
                stacklevel=2,
            )
            data["tensor_parallel_size"] = data.pop("tensor_parralel_size")
        if isinstance(data.get("env"), (str, list)):
            # the original guide's tables: "env" names where the model is served, not variables
            if "environments" in data:
                raise ValueError(
                    "'env' names environments (the original guide's meaning) and 'environments' "
                    "is set too: keep only 'environments'")
            names = data.pop("env")
            warnings.warn(
                "'env' as environment name(s) is the original guide's spelling: rename it "
                "'environments' ('env' is now the server's environment variables)",
                LegacyKeyWarning,
                stacklevel=2,
            )
            data["environments"] = [names] if isinstance(names, str) else names
        for key in sorted(LEGACY_IGNORED_KEYS & data.keys()):
            warnings.warn(
                f"'{key}' is ignored (the deploy tool derives it): remove it",
                LegacyKeyWarning,
                stacklevel=2,
            )
            del data[key]
        return data

    @field_validator("model")
    @classmethod
    def _model_repo(cls, value: str) -> str:
        return check_model_id(value, "hub repo id")

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @field_validator("environments")
    @classmethod
    def _environment_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("'environments' is empty: list at least one, or remove the key")
        return value


class RoutingTable(RootModel[dict[str, ModelSpec]]):
    """``{model id: ModelSpec}`` in file order."""

    model_config = ConfigDict(frozen=True)

    @field_validator("root")
    @classmethod
    def _ids(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if not value:
            raise ValueError("the routing table is empty: add at least one model")
        for model_id in value:
            check_model_id(model_id)
        return value

    def __iter__(self):  # type: ignore[override]
        return iter(self.root.items())

    def __getitem__(self, model_id: str) -> ModelSpec:
        return self.root[model_id]

    def __len__(self) -> int:
        return len(self.root)

    def ids(self) -> list[str]:
        return list(self.root)

    def served_in(self, env: str) -> RoutingTable:
        """The entries an environment serves (those without ``environments`` serve everywhere)."""
        kept = {i: m for i, m in self.root.items() if m.environments is None or env in m.environments}
        return self if len(kept) == len(self.root) else RoutingTable(kept)
