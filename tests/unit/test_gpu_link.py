"""GPU lease helpers: nvidia-smi output (captured from real GPUs), shortfalls, the hook builder."""

from __future__ import annotations

import pytest

from pyalbert.commands import gpu

# `nvidia-smi --query-gpu=index,memory.free,memory.total --format=csv,noheader,nounits` on a
# 2 x A100 80GB host with a vLLM server on GPU 0
TWO_A100 = "0, 7853, 81920\n1, 81037, 81920\n"
# the same query while the driver is gone (exit 9, message on stdout)
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make "
             "sure that the latest NVIDIA driver is installed and running.\n\n")
# MIG / restricted containers print placeholders instead of numbers
PLACEHOLDERS = "0, [N/A], [N/A]\n1, [Insufficient Permissions], 40960\n"


@pytest.mark.parametrize("stdout, expected", [
    (TWO_A100, {0: (7853, 81920), 1: (81037, 81920)}),
    ("0, 81037, 81920", {0: (81037, 81920)}),
    ("  3 ,  100 , 200  \n", {3: (100, 200)}),
    (NO_DRIVER, {}),
    (PLACEHOLDERS, {}),
    ("", {}),
], ids=["two-gpus", "no-newline", "spaces", "no-driver", "placeholders", "empty"])
def test_parse_free_memory(stdout, expected):
    assert gpu.parse_free_memory(stdout) == expected


@pytest.mark.parametrize("need, expected", [
    ({1: 0.9}, []),
    ({0: 0.9}, ["GPU 0: 7853 MiB free, 73728 MiB needed"]),
    ({0: 0.05, 1: 0.5}, []),
    ({0: 0.5, 1: 0.5}, ["GPU 0: 7853 MiB free, 40960 MiB needed"]),
    ({2: 0.5}, ["GPU 2: not listed by nvidia-smi (it lists [0, 1])"]),
    ({}, []),
], ids=["free-gpu", "busy-gpu", "fits", "one-short", "missing-gpu", "no-need"])
def test_shortfalls(need, expected):
    assert gpu.shortfalls(gpu.parse_free_memory(TWO_A100), need) == expected


def test_shortfalls_without_any_gpu_listed():
    assert gpu.shortfalls({}, {0: 0.9}) == ["GPU 0: not listed by nvidia-smi (it lists none)"]


def test_free_memory_and_probe_commands():
    assert gpu.free_memory().render() == ("nvidia-smi --query-gpu=index,memory.free,memory.total "
                                          "--format=csv,noheader,nounits")
    assert gpu.has_nvidia_smi().render() == "sh -c 'command -v nvidia-smi >/dev/null'"


def test_hook_passes_the_lease_details_in_its_environment():
    cmd = gpu.hook("scw instance server attach-gpu $ALBERT_HOST",
                   {"ALBERT_PIPELINE": "42", "ALBERT_ENV": "staging", "ALBERT_HOST": "gpu-1"})
    assert cmd.render() == ("env ALBERT_ENV=staging ALBERT_HOST=gpu-1 ALBERT_PIPELINE=42 sh -c "
                            "'scw instance server attach-gpu $ALBERT_HOST'")


def test_lease_describe_names_the_holder():
    lease = gpu.Lease("staging", "ana@runner-3", "4711", "2025-01-01T13:00:00+00:00")
    assert lease.describe() == ("pipeline 4711 of ana@runner-3 (env staging) until "
                                "2025-01-01T13:00:00+00:00")
    assert gpu.parse_lease(lease.to_json()) == lease
    assert gpu.parse_lease("") is None and gpu.parse_lease('{"env": "x"}') is None
