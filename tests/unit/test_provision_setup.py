"""Builders of the remote setup stage (pyalbert.commands.setup): whole strings, token masked."""

from __future__ import annotations

import subprocess

from pyalbert.commands import setup as s

P = s.SetupPaths("/home/gitlab/albert")
T = "/home/gitlab/albert/tools"


def test_install_tools_golden():
    cmd = s.install_tools(P, "pyalbert-0.1.0-py3-none-any.whl", "abc123")
    pip = f"{T}/bin/pip install -q --no-index --disable-pip-version-check"
    wheel = f"{T}/wheelhouse/pyalbert-0.1.0-py3-none-any.whl"
    assert cmd.render() == (
        "flock /home/gitlab/albert/.tools.lock sh -c '"
        f"{{ test -x {T}/bin/python || python3 -m venv {T}; }}"
        f" && {pip} --find-links {T}/wheelhouse '\"'\"'{wheel}[api]'\"'\"'"
        f" && {pip} --no-deps --force-reinstall {wheel}"
        f" && echo abc123 > {T}/.albert-wheel-sha256'"
    )


def test_unpack_config_replaces_the_folder_then_stamps_it():
    cmd = s.unpack_config(P, "/home/gitlab/albert/config.upload.tar.gz", "d1")
    c = "/home/gitlab/albert/config"
    assert cmd.render() == (
        f"rm -rf {c}.new && mkdir -p {c}.new && tar -xzf /home/gitlab/albert/config.upload.tar.gz "
        f"-C {c}.new && sh -c 'echo d1 > {c}.new/.albert-config-sha256' && rm -rf {c} && "
        f"mv {c}.new {c} && rm -f /home/gitlab/albert/config.upload.tar.gz"
    )


def test_download_models_without_token_is_a_plain_argv():
    cmd = s.download_models(P, "prod", "/data/models", models=["a", "b"],
                            hub_env={"HF_HUB_OFFLINE": "1", "UNRELATED": "x"})
    assert cmd.render() == (
        f"env HF_HUB_OFFLINE=1 {T}/bin/albert download_models --env prod --config-dir "
        "/home/gitlab/albert/config --storage-dir /data/models --model a --model b"
    )
    assert cmd.stdin is None


def test_download_models_token_goes_on_stdin_never_in_argv():
    cmd = s.download_models(P, "prod", "/data/models", models=["a"], hf_token="hf_SECRET",
                            hub_env={"HF_ENDPOINT": "http://10.0.0.1:8000"})
    assert "hf_SECRET" not in cmd.render() and "hf_SECRET" not in cmd.display()
    assert cmd.render() == (
        "sh -c 'IFS= read -r HF_TOKEN && export HF_TOKEN && exec env "
        f"HF_ENDPOINT=http://10.0.0.1:8000 {T}/bin/albert download_models --env prod "
        "--config-dir /home/gitlab/albert/config --storage-dir /data/models --model a'"
    )
    assert cmd.display().endswith("<<< [secret, 10 bytes]")
    # and the shell really exports it to the program
    probe = s.download_models(P, "e", "/s", hf_token="hf_SECRET")
    script = probe.render().replace(f"{T}/bin/albert", "printenv HF_TOKEN; true")
    out = subprocess.run(["bash", "-c", script], input=probe.stdin_text, capture_output=True,
                         text=True)
    assert out.stdout.splitlines()[0] == "hf_SECRET"


def test_create_whitelist_golden():
    assert s.create_whitelist(P, "prod").render() == (
        f"{T}/bin/albert create_whitelist --env prod --config-dir /home/gitlab/albert/config "
        "--output /home/gitlab/albert/shared/whitelist.json"
    )


def test_probe_runs_and_parses_on_this_machine(tmp_path):
    paths = s.SetupPaths(str(tmp_path))
    empty = s.parse_probe(subprocess.run(["bash", "-c", s.probe(paths).render()],
                                         capture_output=True, text=True).stdout)
    assert empty.python and empty.python.isdigit() and empty.machine
    assert empty.wheel is None and empty.config is None and empty.wheelhouse == frozenset()
    (tmp_path / "tools" / "wheelhouse").mkdir(parents=True)
    (tmp_path / "tools" / "wheelhouse" / "a-1-py3-none-any.whl").write_text("")
    (tmp_path / "tools" / ".albert-wheel-sha256").write_text("w1\n")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / ".albert-config-sha256").write_text("c1\n")
    full = s.parse_probe(subprocess.run(["bash", "-c", s.probe(paths).render()],
                                        capture_output=True, text=True).stdout)
    assert (full.wheel, full.config) == ("w1", "c1")
    assert full.wheelhouse == {"a-1-py3-none-any.whl"}


def test_parse_probe_without_python():
    state = s.parse_probe("python=-\nwheel=-\nconfig=-\n")
    assert state.python is None and state.wheel is None


def test_prune_wheelhouse_only_when_stale():
    assert s.prune_wheelhouse(P, {"a.whl"}, frozenset({"a.whl"})) is None
    cmd = s.prune_wheelhouse(P, {"a.whl"}, frozenset({"a.whl", "old.whl"}))
    assert cmd is not None and cmd.render() == f"rm -f {T}/wheelhouse/old.whl"


def test_a_new_build_of_the_same_version_replaces_the_hosts_copy_of_the_wheel(tmp_path, monkeypatch):
    """The build's file name does not change with its content: a host holding an older
    pyalbert-0.1.0 wheel must get the new one (it used to reinstall its stale copy), and the
    cached wheelhouse's own stale pyalbert wheel is never shipped."""
    from pyalbert.engine import setup as engine_setup
    from pyalbert.remote import DryRunner

    house = tmp_path / "house"
    house.mkdir()
    (house / "pyalbert-0.1.0-py3-none-any.whl").write_text("an older build")
    (house / "httpx-0.28.1-py3-none-any.whl").write_text("")
    monkeypatch.setattr(engine_setup, "wheelhouse", lambda *a: house)
    fresh = tmp_path / "dist" / "pyalbert-0.1.0-py3-none-any.whl"
    fresh.parent.mkdir()
    fresh.write_text("this build")
    state = s.HostState(python="311", machine="x86_64", glibc="2.36", wheel="old-digest",
                        wheelhouse=frozenset({fresh.name, "httpx-0.28.1-py3-none-any.whl"}))
    apply = DryRunner("h")
    assert engine_setup._install_tools(apply, P, state, fresh, "new-digest") == 1
    uploads = [c.display() for c in apply.commands if c.display().startswith("# upload")]
    assert uploads == [f"# upload {fresh} to {T}/wheelhouse/{fresh.name}"]
    assert engine_setup.dependency_wheels(house) == [house / "httpx-0.28.1-py3-none-any.whl"]
