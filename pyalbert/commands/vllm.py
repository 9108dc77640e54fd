"""The vLLM OpenAI server's command line, one source for every runtime.

Containers (``docker run IMAGE <args>``), the venv runtime (``python -m
vllm.entrypoints.openai.api_server <args>``) and baked images (``CMD [...]``) all call
:func:`server_args`, so a routing-table entry means the same server everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyalbert.commands.base import Cmd
from pyalbert.config.routing import ModelSpec

MODULE = "vllm.entrypoints.openai.api_server"


def server_args(
    model_id: str,
    model: ModelSpec,
    *,
    model_path: str,
    port: int | None = None,
    host: str = "0.0.0.0",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Arguments of the OpenAI server for one routing-table entry.

    ``model_path`` is where the weights are as the server sees them (a directory in a
    container, on the host, or baked in an image); clients ask for ``model_id``.
    """
    args = [
        "--host", host,
        "--port", str(port if port is not None else model.port),
        "--model", model_path,
        "--served-model-name", model_id,
        "--tensor-parallel-size", str(model.tensor_parallel_size),
        "--gpu-memory-utilization", f"{model.gpu_mem_use:g}",
    ]
    if model.quantization:
        args += ["--quantization", model.quantization]
    if model.max_model_len:
        args += ["--max-model-len", str(model.max_model_len)]
    return [*args, *extra_args, *model.extra_args]


def server(python: str, model_id: str, model: ModelSpec, **kwargs) -> Cmd:
    """``python -m vllm.entrypoints.openai.api_server ...`` (venv runtime, tests)."""
    return Cmd.of(python, "-m", MODULE, server_args(model_id, model, **kwargs))
