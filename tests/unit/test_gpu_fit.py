"""On GPU hosts the preflight reads the free GPU memory (nvidia-smi) and the "will it fit"
estimate before anything stops (issue 15 item 3): captured nvidia-smi outputs in, verdicts out."""

import json

import pytest

from pyalbert.remote import Result
from pyalbert.runtimes.checks import HostFacts
from pyalbert.runtimes.gpu_fit import MARK, GpuMemoryFit, parse_gpu_fit, read_gpu_fit

# Llama-3.1-8B-Instruct's config.json (trimmed) and its weight files' sizes (4 safetensors)
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "max_position_embeddings": 131072,
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}, "torch_dtype": "bfloat16",
            "vocab_size": 128256}
LLAMA_8B_FILES = (4976698672, 4999802720, 4915916176, 1168138808)
# `nvidia-smi --query-gpu=index,memory.free,memory.total --format=csv,noheader,nounits`
H100_X2_IDLE = "0, 81080, 81559\n1, 81080, 81559\n"
#: an L4 where another process holds 12 GB
L4_BUSY = "0, 10730, 23034\n"
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make "
             "sure that the latest NVIDIA driver is installed and running.\n\n")
UNIT = "albert-prod-vllm-m-a"


def output(smi: str, code: int = 0, config: dict | None = LLAMA_8B,
           files: tuple[int, ...] = LLAMA_8B_FILES) -> str:
    """What :func:`read_gpu_fit` prints on a host."""
    text = json.dumps(config) if config is not None else ""
    sizes = "".join(f"{s}\n" for s in files)
    return f"{smi}{MARK} smi {code}\n{text}\n{MARK} weights\n{sizes}"


def judge(stdout: str, *, gpus=(0,), share=0.9, max_model_len=8192, running=(), beside=False,
          quantization=None):
    check = GpuMemoryFit("m-a", (UNIT, UNIT + "-spare"), "/data/models/m-a", gpus, share, max_model_len,
                         quantization=quantization, beside=beside)
    host = HostFacts("gitlab", "prod", "/srv/albert", lambda: set(running))
    return check.verdict(Result(check.cmd, 0, stdout, ""), host)


def test_the_command_is_one_fact_that_never_fails():
    assert read_gpu_fit("/data/models/m a").render() == (
        "sh -c 'nvidia-smi --query-gpu=index,memory.free,memory.total --format=csv,noheader,"
        "nounits 2>&1; echo \"@@albert-gpu-fit smi $?\"; cat '\"'\"'/data/models/m a'\"'\"'/config.json "
        "2>/dev/null; echo; echo \"@@albert-gpu-fit weights\"; find -L '\"'\"'/data/models/m a'\"'\"' "
        "-maxdepth 1 -name '\"'\"'*.safetensors'\"'\"' -printf '\"'\"'%s\\n'\"'\"' 2>/dev/null; true'")


def test_parse_reads_memory_config_and_weights():
    facts = parse_gpu_fit(output(H100_X2_IDLE))
    assert facts.smi_exit == 0 and facts.memory == {0: (81080, 81559), 1: (81080, 81559)}
    assert facts.config["num_key_value_heads"] == 8 and facts.weight_bytes == sum(LLAMA_8B_FILES)
    bare = parse_gpu_fit(output(NO_DRIVER, code=9, config=None, files=()))
    assert bare.smi_exit == 9 and bare.memory == {} and bare.config is None
    assert bare.weight_bytes is None


@pytest.mark.parametrize("stdout, kw", [
    (output(H100_X2_IDLE), {}),
    (output(H100_X2_IDLE), {"gpus": (0, 1), "max_model_len": 131072}),
    # the server being replaced holds 10 GB of the L4 it runs on: it stops first, that counts
    (output("0, 3000, 23034\n", files=(2 * 10**9,)), {"share": 0.4, "running": (UNIT,)}),
], ids=["idle-h100", "tp2-full-context", "replaced-server-frees-its-memory"])
def test_fits(stdout, kw):
    assert judge(stdout, **kw) is None


def test_a_gpu_with_too_little_free_memory_is_refused_naming_key_and_fix():
    text = judge(output(L4_BUSY), share=0.9)
    assert text == (
        "model m-a: not enough free GPU memory (GPU 0: 10730 MiB free, 20730 MiB needed "
        "(gpu_mem_use 0.9 x 23034 MiB)); vLLM would exit at start. Fix: stop what uses the GPU "
        "(`nvidia-smi` shows which process), or lower gpu_mem_use in the routing-table entry "
        "'m-a'.")


def test_beside_the_old_server_nothing_is_counted_back():
    small = output("0, 3000, 23034\n", files=(2 * 10**9,))
    assert judge(small, share=0.4, running=(UNIT,)) is None
    assert judge(small, share=0.4, running=(UNIT + "-spare",)) is None  # the other slot serves
    text = judge(small, share=0.4, running=(UNIT,), beside=True)
    assert "GPU 0: 3000 MiB free, 9213 MiB needed" in text
    # another unit running frees nothing either
    assert "3000 MiB free" in judge(small, share=0.4, running=("albert-prod-vllm-m-b",))


def test_only_the_units_gpus_count_and_a_missing_gpu_is_named():
    smi = "0, 500, 81559\n1, 81080, 81559\n"
    assert judge(output(smi), gpus=(1,)) is None
    assert "GPU 0: 500 MiB free" in judge(output(smi), gpus=(0, 1))
    text = judge(output(smi), gpus=(2,))
    assert "GPU 2 is not listed by nvidia-smi (it lists [0, 1])" in text


def test_the_model_that_will_not_fit_its_share_is_refused_with_the_numbers():
    # the full 128k context on one L4: weights 14.96 GiB + KV cache 16 GiB > 0.9 x 22.49 GiB
    text = judge(output("0, 22800, 23034\n"), max_model_len=131072)
    assert text.startswith("model m-a will not fit in its GPU memory share: m-a: needs 31.96 GiB "
                           "per GPU = weights 14.96 GiB (weight files) + KV cache for 131072 "
                           "tokens 16.00 GiB (128 KiB/token) + margin 1.00 GiB; budget 20.24 GiB")
    assert text.endswith("Fix: in the routing-table entry 'm-a' raise gpu_mem_use or "
                         "tensor_parallel_size, lower max_model_len, or use a quantized "
                         "checkpoint (awq/gptq).")
    # 8k tokens fit, and two GPUs hold the full context
    assert judge(output("0, 22800, 23034\n"), max_model_len=8192) is None
    assert judge(output("0, 22800, 23034\n1, 22800, 23034\n"), gpus=(0, 1), share=0.95,
                 max_model_len=131072) is None


def test_a_config_without_the_shape_keys_skips_the_estimate():
    assert judge(output(H100_X2_IDLE, config={"max_position_embeddings": 8192}, files=())) is None


def test_nvidia_smi_failing_is_refused_with_its_message():
    text = judge(output(NO_DRIVER, code=9, config=None, files=()))
    assert text.startswith("model m-a: nvidia-smi does not answer (exit 9: NVIDIA-SMI has failed "
                           "because it couldn't communicate with the NVIDIA driver.")
    assert "gpus = 0" in text
    missing = judge(output("sh: 1: nvidia-smi: not found\n", code=127))
    assert "exit 127: sh: 1: nvidia-smi: not found" in missing


def test_the_dry_run_shows_the_check_without_judging():
    check = GpuMemoryFit("m-a", (UNIT,), "/m", (0,), 0.9, None)
    host = HostFacts("gitlab", "prod", "/srv/albert", lambda: set())
    assert check.verdict(Result(check.cmd, 0, "", "", known=False), host) is None
