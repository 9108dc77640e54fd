"""The model servers' own key: every vLLM server of an environment requires it, only the gateway
sends it (issue 14: nothing bypasses the gateway).

Where it comes from, first found wins (no new CI variable needed, stable across runs):

1. ``[secrets] vllm_api_key`` (``$ALBERT_VLLM_API_KEY`` by default), when set;
2. HMAC-SHA256 of the environment's name keyed with the deploy's SSH private key (the variable
   ``[ssh] key_env`` names: a path or the key itself), so every pipeline of one environment
   derives the same key and a new SSH key rotates it;
3. on a machine with neither (ssh-agent, a laptop), a random key generated once and kept 0600 in
   ``$XDG_STATE_HOME/albert/vllm-api-key-<env>``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from pyalbert.errors import AlbertError

#: what the derivation signs: a key for this purpose only, never the SSH key itself
CONTEXT = b"albert vllm api key\x00"


def derive(material: bytes, env: str) -> str:
    """Pure: the key of environment ``env`` from SSH key material."""
    return "albert-vllm-" + hmac.new(material, CONTEXT + env.encode(), hashlib.sha256).hexdigest()


def resolve(env, environ: Mapping[str, str] | None = None, state_dir: Path | None = None) -> str:
    """The key of environment ``env`` (an EnvironmentSpec): see the module's docstring."""
    environ = os.environ if environ is None else environ
    ref = env.secrets.get("vllm_api_key")
    value = ref.resolve(dict(environ)) if ref else None
    if value is not None:
        key = value.get_secret_value().strip()
        if not key or any(c.isspace() for c in key):
            raise AlbertError(f"${ref.env} (the vllm_api_key secret) must be one word without "
                              "spaces or line breaks. Fix: set it to a long random string, or "
                              "unset it to derive the key from the SSH key.")
        return key
    material = environ.get(env.ssh.key_env, "")
    if material:
        if os.path.isfile(material):
            try:
                data = Path(material).read_bytes()
            except OSError as exc:
                raise AlbertError(f"${env.ssh.key_env} names {material!r}, which cannot be read "
                                  f"({exc.strerror}). Fix: point it at the deploy's private key."
                                  ) from None
        else:
            data = material.encode()
        return derive(data.strip(), env.name)
    return _kept(env.name, state_dir or _state_dir(environ))


def _state_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "albert"


def _kept(env: str, folder: Path) -> str:
    path = folder / f"vllm-api-key-{env}"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = "albert-vllm-" + secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    return key
