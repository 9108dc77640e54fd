"""Build ``albert-test/fake-vllm:<hash>`` from this folder on the python test image (~2 s)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from tests.support import images

HERE = Path(__file__).parent
DOCKERFILE = """\
FROM {base}
COPY fake /opt/fake
RUN printf '#!/bin/sh\\nexec python3 /opt/fake/albert_api.py "$@"\\n' > /usr/local/bin/albert \\
 && chmod 755 /usr/local/bin/albert
ENV PYTHONPATH=/opt/fake PYTHONUNBUFFERED=1
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
"""


def _sources() -> list[Path]:
    skip = {HERE / "image.py", HERE / "__init__.py"}
    return sorted(p for p in HERE.rglob("*.py") if "__pycache__" not in p.parts and p not in skip)


def tag(base: str = images.PYTHON_IMAGE) -> str:
    digest = hashlib.sha256(DOCKERFILE.encode())
    if base != images.PYTHON_IMAGE:
        digest.update(base.encode())
    for path in _sources():
        digest.update(str(path.relative_to(HERE)).encode() + path.read_bytes())
    return f"albert-test/fake-vllm:{digest.hexdigest()[:10]}"


def ensure_fake_vllm_image(socket: str = images.ROOT_SOCKET, base: str | None = None) -> str:
    """The image in the root-namespace dockerd (built once per content). ``base``: an image of
    that dockerd to build on (the Ray image, for Ray groups); default the python image."""
    base = base or images.ensure_python_image(socket)
    name = tag(base)
    if images.image_exists(name, socket):
        return name
    with tempfile.TemporaryDirectory(prefix="albert-fake-vllm-") as tmp:
        context = Path(tmp)
        for path in _sources():
            dest = context / "fake" / path.relative_to(HERE)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
        (context / "Dockerfile").write_text(DOCKERFILE.format(base=base))
        images.build(context, name, socket)
    return name
