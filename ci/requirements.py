"""The CI/CD variables the pipeline's jobs need, derived from the config model.

One source of truth: ``EnvironmentSpec.secrets`` (SecretRefs) and ``EnvironmentSpec.ssh``
(``key_env``, ``known_hosts_env``). Each becomes a variable scoped to the environment (GitLab
only gives environment-scoped variables to jobs whose ``environment:name`` matches, which is why
every host-side job of ``.gitlab-ci.yml`` declares one). Secrets are protected in every
environment, and every variable of a ``production`` tier environment: GitLab gives a protected
variable only to pipelines of protected branches, so a job that any branch adds with
``environment: staging`` cannot read staging's SSH key or tokens (the deploying branches,
``staging`` and ``main``, must be protected). Secrets are masked when GitLab can mask them
(single-line values; File variables hold multi-line content).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyalbert.config import DeploymentSpec

#: what GitLab accepts for a masked value
MASKABLE = re.compile(r"^[A-Za-z0-9+/=@:.~_-]{8,}$")


@dataclass(frozen=True)
class VariableSpec:
    key: str
    scope: str
    file: bool
    secret: bool
    protected: bool
    masked: bool
    required: bool
    description: str
    source: str

    @property
    def variable_type(self) -> str:
        return "file" if self.file else "env_var"


def required_variables(spec: DeploymentSpec) -> list[VariableSpec]:
    env = spec.env
    protected = env.tier == "production"  # everything; secrets are protected in every tier
    config = f"config/environments/{spec.env_file.name}"
    out = [
        VariableSpec(
            key=env.ssh.key_env, scope=env.name, file=True, secret=True, protected=True,
            masked=False, required=True, source=f"{config}: ssh.key_env",
            description="private key the jobs use to SSH to the hosts (File variable)",
        ),
        VariableSpec(
            key=env.ssh.known_hosts_env, scope=env.name, file=True, secret=False,
            protected=protected, masked=False, required=True,
            source=f"{config}: ssh.known_hosts_env",
            description="known_hosts lines of every host (File variable; host keys are checked)",
        ),
    ]
    for name, ref in sorted(env.secrets.items()):
        out.append(
            VariableSpec(
                key=ref.env, scope=env.name, file=ref.file, secret=True, protected=True,
                masked=not ref.file, required=ref.required, source=f"{config}: secrets.{name}",
                description=ref.description,
            )
        )
    return out


def maskable(value: str) -> bool:
    return bool(MASKABLE.match(value))
