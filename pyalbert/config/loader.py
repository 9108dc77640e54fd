"""Read and validate configuration files, turning every mistake into a :class:`Problem`.

Nothing here touches a host: ``load_spec`` either returns a fully validated
:class:`DeploymentSpec` or raises :class:`ConfigError` listing every problem found.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pyalbert.config.deployment import Deployment
from pyalbert.config.environment import EnvironmentSpec
from pyalbert.config.placement import resolve_placement
from pyalbert.config.routing import LegacyKeyWarning, ModelSpec, RoutingTable
from pyalbert.config.spec import DeploymentSpec, display_path
from pyalbert.errors import ConfigError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Ubuntu 22.04 hosts run 3.10
    import tomli as tomllib

ENV_SUFFIXES = (".toml", ".yaml", ".yml")


def find_config_dir(start: Path | None = None) -> Path:
    """``$ALBERT_CONFIG_DIR``, else the nearest ``config/`` holding ``environments/``."""
    if os.environ.get("ALBERT_CONFIG_DIR"):
        return Path(os.environ["ALBERT_CONFIG_DIR"])
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "config" / "environments").is_dir():
            return folder / "config"
    repo = Path(__file__).resolve().parents[2] / "config"
    if (repo / "environments").is_dir():
        return repo
    return here / "config"


def read_document(path: Path) -> Any:
    """Parse a JSON, TOML or YAML file; syntax errors name line and column."""
    name = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            Problem(name, "", "file not found", "create it, or check --env and the config dir")
        ) from None
    except OSError as exc:
        raise ConfigError(Problem(name, "", f"cannot read file ({exc.strerror})")) from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix == ".toml":
            return tomllib.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            Problem(
                name,
                "",
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                "correct the syntax there (a trailing comma or a missing quote is the usual cause)",
            )
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            Problem(name, "", f"malformed TOML: {exc}", "correct the syntax there")
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            Problem(name, "", f"malformed YAML: {exc}".replace("\n", " "), "correct the syntax")
        ) from None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at ``loc`` (for 'did you mean'), best effort."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if not fields:
            if current is RoutingTable:
                current = ModelSpec
            continue
        info = fields.get(part)
        if info is None:
            continue
        annotation = info.annotation
        nested = None
        for arg in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                nested = arg
        current = nested
    if current is RoutingTable:
        current = ModelSpec
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def problems_from(exc: ValidationError, file: str, model: type[BaseModel]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p != "root")
        key = ".".join(str(p) for p in loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            fix = f"did you mean '{close[0]}'?" if close else "remove it"
            if valid:
                fix += f" (valid keys: {', '.join(valid)})"
            problems.append(Problem(file, key, "unknown key", fix))
        elif kind == "missing":
            problems.append(Problem(file, key, "required key is missing", "add it"))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(Problem(file, key, msg, f"got {err.get('input')!r}"))
    return problems


def validate_document(model: type[BaseModel], data: Any, file: str) -> tuple[Any, list[str]]:
    """Validate ``data`` against ``model``; returns (instance, deprecation warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LegacyKeyWarning)
        try:
            value = model.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(problems_from(exc, file, model)) from None
    notes = [f"{file}: {w.message}" for w in caught if issubclass(w.category, LegacyKeyWarning)]
    return value, notes


def environment_path(config_dir: Path, env: str) -> Path:
    folder = config_dir / "environments"
    for suffix in ENV_SUFFIXES:
        if (folder / f"{env}{suffix}").is_file():
            return folder / f"{env}{suffix}"
    known = sorted({p.stem for p in folder.glob("*") if p.suffix in ENV_SUFFIXES})
    raise ConfigError(
        Problem(
            display_path(folder),
            "",
            f"no environment named {env!r}",
            f"use one of: {', '.join(known)}" if known else "create environments/<name>.toml",
        )
    )


#: environment variables that override a key of the environment file (the pipeline sets the
#: images it just built: ``$CI_REGISTRY_IMAGE/vllm:$CI_COMMIT_SHA``)
OVERRIDES = {"ALBERT_VLLM_IMAGE": ("images", "vllm"), "ALBERT_API_IMAGE": ("images", "api")}


def apply_overrides(data: dict, environ: dict[str, str] | None = None) -> dict:
    """Precedence: environment variable > environment file > defaults."""
    environ = os.environ if environ is None else environ
    for var, (section, key) in OVERRIDES.items():
        if environ.get(var):
            block = data.get(section)
            data[section] = {**(block if isinstance(block, dict) else {}), key: environ[var]}
    return data


def load_routing_table(path: Path) -> tuple[RoutingTable, list[str]]:
    data = read_document(path)
    return validate_document(RoutingTable, data, display_path(path))


def served_models(table: RoutingTable, env: str, routing_file: Path) -> RoutingTable:
    try:
        return table.served_in(env)
    except ValidationError:  # nothing left
        raise ConfigError(Problem(
            display_path(routing_file), "environments",
            f"no model is served in environment {env!r} (every entry names other environments)",
            f"add {env!r} to the 'environments' (or the guide's 'env') of the models it serves",
        )) from None


def load_spec(env: str, config_dir: Path | None = None) -> Deployment:
    """Load ``environments/<env>`` and its routing table, validate both, then place the models:
    one resolved :class:`Deployment` (spec + placement), resolved once."""
    config_dir = config_dir or find_config_dir()
    env_file = environment_path(config_dir, env)
    data = read_document(env_file)
    if isinstance(data, dict):
        data.setdefault("name", env)
        data = apply_overrides(data)
    environment, notes = validate_document(EnvironmentSpec, data, display_path(env_file))
    routing_file = (config_dir / environment.routing_table).resolve()
    table, more = load_routing_table(routing_file)
    models = served_models(table, environment.name, routing_file)
    spec = DeploymentSpec(
        env=environment,
        models=models,
        config_dir=config_dir,
        env_file=env_file,
        routing_file=routing_file,
        notes=tuple(notes + more),
    )
    return Deployment.of(spec, resolve_placement(spec))  # ConfigError on clashes, over-subscription
