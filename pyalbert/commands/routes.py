"""A replace without downtime, as commands: the gateway's routes folder, a server's in-flight
requests, the room a host has for a second server.

The routes folder (``{base_dir}/routes-{env}`` on every gateway host) holds one file per model
replica, named after its unit; the gateway watches it (:mod:`pyalbert.api.backends_reload`).
Each model host writes only its own replicas' files, each write an atomic rename: hosts that
deploy at once never edit the same file.
"""

from __future__ import annotations

import json
import re

from pyalbert.commands import release
from pyalbert.commands.base import Cmd, Op, any_of
from pyalbert.commands.health import get_json

#: vLLM's gauges of requests it holds (running in a batch, queued)
IN_FLIGHT_RE = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$",
                          re.M)
#: the folder's own note (written with the api's files, so that the folder exists when it starts)
README = ("Routes of the model replicas, watched by the api gateway (albert api --routes).\n"
          "Written by the deploy during a model replace; one file per replica.\n")
IN_CONTAINER = "/etc/albert-routes"
GIB = 1 << 30
#: what a vLLM CPU server allocates for its KV cache unless ``VLLM_CPU_KVCACHE_SPACE`` says (GiB)
CPU_KV_DEFAULT_GIB = 4
#: Python, torch and vLLM themselves, beside weights and KV cache
CPU_OVERHEAD_BYTES = 1 * GIB


def routes_dir(base_dir: str, env: str) -> str:
    return f"{base_dir}/routes-{env}"


def route_file(folder: str, unit: str) -> str:
    return f"{folder}/{unit}.json"


def route_text(model: str, base: str, url: str | None, retry_after: int) -> str:
    return json.dumps({"model": model, "base": base, "url": url, "retry_after": retry_after},
                      sort_keys=True) + "\n"


def point(folder: str, unit: str, model: str, base: str, url: str | None,
          retry_after: int = 5) -> Cmd:
    """Route the replica the gateway knows as ``base`` to ``url`` (None: out of rotation, the
    gateway answers 503 with ``Retry-After: retry_after`` when no other replica serves)."""
    return release.put(route_file(folder, unit), route_text(model, base, url, retry_after))


def read(folder: str, unit: str) -> Cmd:
    return any_of(Cmd.of("cat", route_file(folder, unit), Op("2>/dev/null")), Cmd.of("true"))


def in_flight(url: str) -> Cmd:
    """The server's ``/metrics`` (open without its key, as in vLLM)."""
    return get_json(f"{url}/metrics")


def parse_in_flight(stdout: str) -> int | None:
    """Requests running + waiting; None when the server did not answer with its gauges."""
    found = IN_FLIGHT_RE.findall(stdout)
    if not found:
        return None
    return int(sum(float(v) for v in found))


def memory(model_dir: str) -> Cmd:
    """Available RAM (``MemAvailable``, kB) and the weights' size (bytes, symlinks followed)."""
    script = ('grep -m1 MemAvailable /proc/meminfo; du -sbL "$1" 2>/dev/null || echo "0 $1"')
    return Cmd.of("sh", "-c", script, "memory", model_dir)


def parse_memory(stdout: str) -> tuple[int, int] | None:
    """``(available bytes, weights bytes)``; None when the output is not understood."""
    avail = re.search(r"^MemAvailable:\s+(\d+)\s*kB", stdout, re.M)
    weights = re.search(r"^(\d+)\s", stdout.split("\n", 1)[1] if "\n" in stdout else "", re.M)
    if not avail or not weights:
        return None
    return int(avail[1]) * 1024, int(weights[1])


def cpu_estimate(weights: int, kv_gib: float) -> int:
    """Bytes a second vLLM CPU server needs: weights + KV cache + overhead."""
    return int(weights + kv_gib * GIB + CPU_OVERHEAD_BYTES)
