"""ci.variables: derived from the config model, compared and synced against a fake GitLab."""

from __future__ import annotations

import socket

import pytest

from ci import variables
from ci.requirements import required_variables
from pyalbert.config import load_spec
from tests.support.fake_gitlab import serve

REPO_CONFIG = variables.pipeline_file.REPO / "config"
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAsecretkeymaterial\n-----END OPENSSH PRIVATE KEY-----\n"


def needs(env: str):
    return required_variables(load_spec(env, REPO_CONFIG))


def flags(specs):
    return {v.key: (v.variable_type, v.protected, v.masked, v.required) for v in specs}


# --- derived from the config ------------------------------------------------------------------
def test_staging_secrets_are_protected_and_only_known_hosts_is_not():
    """An unprotected staging secret is read by any branch that adds a job with
    ``environment: staging``: every secret is protected, whatever the tier."""
    assert flags(needs("staging")) == {
        "SSH_PRIVATE_KEY": ("file", True, False, True),
        "SSH_KNOWN_HOSTS": ("file", False, False, True),  # public host keys, not a secret
        "HF_TOKEN": ("env_var", True, True, False),
        "ALBERT_API_KEYS": ("file", True, False, False),
        "ALBERT_TLS_CERT": ("file", True, False, False),
        "ALBERT_API_KEY": ("env_var", True, True, False),
        # optional: derived from SSH_PRIVATE_KEY when unset (issue 14)
        "ALBERT_VLLM_API_KEY": ("env_var", True, True, False),
    }
    assert {v.scope for v in needs("staging")} == {"staging"}
    assert all(v.protected for v in needs("staging") if v.secret)


def test_production_variables_are_protected():
    assert all(v.protected and v.scope == "production" for v in needs("production"))


def test_variables_follow_the_config_model(config_factory):
    config_factory.env("""
        tier = "production"
        [[hosts]]
        name = "h1"
        address = "10.0.0.1"
        [ssh]
        key_env = "DEPLOY_KEY"
        [secrets.registry]
        env = "REGISTRY_TOKEN"
        description = "pull token"
    """, name="prod2")
    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    specs = {v.key: v for v in required_variables(load_spec("prod2", config_factory.root))}
    assert "DEPLOY_KEY" in specs and "SSH_PRIVATE_KEY" not in specs
    token = specs["REGISTRY_TOKEN"]
    assert (token.scope, token.protected, token.masked, token.required) == ("prod2", True, True, True)
    assert token.source.endswith("secrets.registry")


# --- pure comparison --------------------------------------------------------------------------
def var(key, scope="staging", **kw):
    return {"key": key, "environment_scope": scope, "variable_type": kw.pop("type", "env_var"),
            "protected": False, "masked": False, "value": "x" * 12, **kw}


def by_key(findings):
    return {f.key: (f.status, f.detail) for f in findings}


def test_check_reports_missing_optional_scope_and_flags():
    existing = [
        var("SSH_PRIVATE_KEY", scope="production", type="file"),   # other env only
        var("SSH_KNOWN_HOSTS", type="env_var"),                    # wrong type
        var("HF_TOKEN", scope="stag*"),                            # wildcard, not masked
    ]
    result = by_key(variables.check(needs("staging"), existing))
    assert result["SSH_PRIVATE_KEY"] == ("wrong scope", "defined for production, not for staging")
    assert result["SSH_KNOWN_HOSTS"] == ("wrong flags", "must be of type 'file', not 'env_var'")
    assert result["HF_TOKEN"] == ("wrong flags", "must be protected; must be masked")
    assert result["ALBERT_API_KEY"][0] == "optional"


def test_production_secret_shared_with_every_environment_is_wrongly_scoped():
    existing = [var("SSH_PRIVATE_KEY", scope="*", type="file", protected=True)]
    result = by_key(variables.check(needs("production"), existing))
    assert result["SSH_PRIVATE_KEY"][0] == "wrong scope"
    assert result["SSH_KNOWN_HOSTS"][0] == "missing"
    unprotected = [var("SSH_PRIVATE_KEY", scope="production", type="file")]
    assert by_key(variables.check(needs("production"), unprotected))["SSH_PRIVATE_KEY"] == (
        "wrong flags", "must be protected")


def test_exact_scope_wins_over_wildcard():
    existing = [var("HF_TOKEN", scope="*"), var("HF_TOKEN", masked=True, protected=True)]
    assert by_key(variables.check(needs("staging"), existing))["HF_TOKEN"] == ("ok", "")


def test_a_secret_shared_with_every_environment_is_wrongly_scoped_in_staging_too():
    existing = [var("HF_TOKEN", scope="*", masked=True, protected=True)]
    assert by_key(variables.check(needs("staging"), existing))["HF_TOKEN"][0] == "wrong scope"


def test_plan_sync_creates_updates_and_leaves_equal_values():
    required = needs("staging")
    existing = [var("HF_TOKEN", masked=True, raw=True, protected=True, value="hf_same_value"),
                var("ALBERT_API_KEY", masked=False, raw=True, protected=True, value="key_same_value")]
    values = {("HF_TOKEN", "staging"): "hf_same_value", ("ALBERT_API_KEY", "staging"): "key_same_value",
              ("SSH_PRIVATE_KEY", "staging"): SSH_KEY}
    changes = {c.key: (c.action, c.why) for c in variables.plan_sync(required, values, existing)}
    assert changes == {"HF_TOKEN": ("unchanged", ""), "ALBERT_API_KEY": ("update", "masked"),
                       "SSH_PRIVATE_KEY": ("create", "new")}


def test_values_file_rejects_unknown_keys_and_unmaskable_values(tmp_path):
    path = tmp_path / "values.toml"
    path.write_text('[staging]\nHF_TOKN = "hf_abcdefgh"\n')
    with pytest.raises(variables.AlbertError, match="HF_TOKN is no variable the jobs read"):
        variables.read_values(path, needs("staging"))
    path.write_text('[staging]\nHF_TOKEN = "two words"\n')
    with pytest.raises(variables.AlbertError, match="cannot mask this value"):
        variables.read_values(path, needs("staging"))
    path.write_text('[prod]\nHF_TOKEN = "hf_abcdefgh"\n')
    with pytest.raises(variables.AlbertError, match="'prod' is not one the pipeline deploys"):
        variables.read_values(path, needs("staging"))


# --- against the fake GitLab (python-gitlab unchanged) ----------------------------------------
@pytest.fixture
def fake(monkeypatch):
    fake = serve(monkeypatch)
    yield fake
    fake.stop()


def values_file(tmp_path):
    key = tmp_path / "id_staging"
    key.write_text(SSH_KEY)
    path = tmp_path / "values.yaml"
    path.write_text(
        "staging:\n"
        f"  SSH_PRIVATE_KEY: {{file: {key}}}\n"
        "  SSH_KNOWN_HOSTS: 'staging.albert.internal ssh-ed25519 AAAAC3Nza'\n"
        "  HF_TOKEN: hf_supersecret123\n"
    )
    return path


def test_check_then_sync_then_check(fake, tmp_path, capsys):
    assert variables.main(["check", "--env", "staging"]) == 1
    out = capsys.readouterr()
    assert "SSH_PRIVATE_KEY (staging: missing)" in out.err and "SSH_KNOWN_HOSTS" in out.err

    assert variables.main(["sync", "--env", "staging", "--from", str(values_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "created  SSH_PRIVATE_KEY (staging)" in out and "3 changed, 0 unchanged" in out
    assert "hf_supersecret123" not in out and "secretkeymaterial" not in out
    stored = {v["key"]: v for v in fake.variables}
    assert stored["SSH_PRIVATE_KEY"]["value"] == SSH_KEY
    assert stored["SSH_PRIVATE_KEY"]["variable_type"] == "file"
    assert stored["HF_TOKEN"]["masked"] is True and stored["HF_TOKEN"]["environment_scope"] == "staging"
    assert stored["HF_TOKEN"]["protected"] is True and stored["SSH_PRIVATE_KEY"]["protected"] is True
    assert stored["SSH_KNOWN_HOSTS"]["protected"] is False

    assert variables.main(["check", "--env", "staging"]) == 0
    assert "all required variables are set" in capsys.readouterr().out


def test_check_fails_on_unprotected_staging_secrets(fake, capsys):
    """The project as the previous rules set it up: staging secrets not protected."""
    fake.variables += [
        var("SSH_PRIVATE_KEY", type="file", value=SSH_KEY),
        var("SSH_KNOWN_HOSTS", type="file", value="staging.albert.internal ssh-ed25519 AAAAC3Nza"),
        var("HF_TOKEN", masked=True, value="hf_supersecret123"),
        var("ALBERT_API_KEYS", type="file", value="keys: []\n"),
        var("ALBERT_API_KEY", masked=True, protected=True, value="key_protected_1"),
    ]

    assert variables.main(["check", "--env", "staging"]) == 1

    out = capsys.readouterr()
    err = " ".join(out.err.split())
    for key in ("SSH_PRIVATE_KEY", "HF_TOKEN", "ALBERT_API_KEYS"):
        assert f"{key} (staging: wrong flags)" in err
    assert "SSH_KNOWN_HOSTS" not in err and "ALBERT_API_KEY (" not in err
    assert "SSH_PRIVATE_KEY, ALBERT_API_KEYS, HF_TOKEN hold secrets and must be protected" in err
    assert "job with `environment: staging`" in err and "protect the `staging` branch" in err


def test_sync_protects_an_unprotected_secret(fake, tmp_path, capsys):
    fake.variables += [var("HF_TOKEN", masked=True, raw=True, value="hf_supersecret123")]
    path = tmp_path / "v.toml"
    path.write_text('[staging]\nHF_TOKEN = "hf_supersecret123"\n')
    assert variables.main(["sync", "--env", "staging", "--from", str(path)]) == 0
    assert "updated  HF_TOKEN (staging): protected" in capsys.readouterr().out
    assert [v["protected"] for v in fake.variables if v["key"] == "HF_TOKEN"] == [True]


def test_docs_say_to_protect_the_deploying_branches():
    text = " ".join(variables.DOCS.read_text().split())
    assert "protect the `staging` branch" in text
    assert "| `HF_TOKEN` | env_var | yes | yes | no | config/environments/staging.toml" in text


def test_second_sync_changes_nothing(fake, tmp_path, capsys):
    path = values_file(tmp_path)
    assert variables.main(["sync", "--env", "staging", "--from", str(path)]) == 0
    writes = len([r for r in fake.requests if r[0] != "GET"])
    assert variables.main(["sync", "--env", "staging", "--from", str(path)]) == 0
    assert "0 changed, 3 unchanged" in capsys.readouterr().out
    assert len([r for r in fake.requests if r[0] != "GET"]) == writes


def test_sync_updates_only_the_scope_it_names(fake, tmp_path, capsys):
    fake.variables += [var("HF_TOKEN", scope="production", masked=True, protected=True, value="hf_prodvalue1"),
                       var("HF_TOKEN", scope="staging", masked=True, protected=True, value="hf_oldvalue12")]
    path = tmp_path / "v.toml"
    path.write_text('[staging]\nHF_TOKEN = "hf_newvalue12"\n')
    assert variables.main(["sync", "--env", "staging", "--from", str(path)]) == 0
    values = {v["environment_scope"]: v["value"] for v in fake.variables if v["key"] == "HF_TOKEN"}
    assert values == {"production": "hf_prodvalue1", "staging": "hf_newvalue12"}
    assert "updated  HF_TOKEN (staging): value" in capsys.readouterr().out


def test_dry_run_writes_nothing(fake, tmp_path, capsys):
    assert variables.main(["sync", "--env", "staging", "--dry-run", "--from", str(values_file(tmp_path))]) == 0
    assert fake.variables == [] and "would create  HF_TOKEN (staging)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda mp, fake: mp.setenv("GITLAB_TOKEN", "wrong"), "rejected the token from GITLAB_TOKEN (401)"),
        (lambda mp, fake: fake.tokens.update({"good-token": "reporter"}), "may not list the project's CI/CD variables"),
        (lambda mp, fake: mp.setenv("CI_PROJECT_ID", "999"), "answered 404"),
    ],
    ids=["401", "403", "404"],
)
def test_gitlab_refusals_are_one_paragraph(fake, monkeypatch, capsys, setup, expected):
    setup(monkeypatch, fake)
    assert variables.main(["check", "--env", "staging"]) == 1
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()) and "Traceback" not in err


def test_unreachable_gitlab(monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GITLAB_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GITLAB_TOKEN", "t")
    monkeypatch.setenv("CI_PROJECT_ID", "1")
    assert variables.main(["check", "--env", "staging"]) == 1
    assert "cannot reach GitLab at http://127.0.0.1" in " ".join(capsys.readouterr().err.split())


def test_missing_settings_name_the_variables(monkeypatch, capsys):
    for name in ("GITLAB_URL", "CI_SERVER_URL", "GITLAB_TOKEN", "CI_JOB_TOKEN", "CI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    assert variables.main(["check", "--env", "staging"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "GITLAB_URL or CI_SERVER_URL" in err and "CI_PROJECT_ID" in err and "GITLAB_TOKEN" in err


def test_job_token_is_sent_as_job_token(fake, monkeypatch):
    monkeypatch.delenv("GITLAB_TOKEN")
    monkeypatch.setenv("CI_JOB_TOKEN", "good-token")
    assert variables.main(["check", "--env", "staging"]) == 1  # reached GitLab, variables missing
    assert ("GET", "/api/v4/projects/42/variables") in fake.requests


# --- docs -------------------------------------------------------------------------------------
def test_docs_are_current():
    assert variables.DOCS.read_text() == variables.docs_text(), "run: python -m ci.variables docs"
