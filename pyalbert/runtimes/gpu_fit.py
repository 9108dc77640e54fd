"""On GPU hosts, before anything stops: the GPUs a vLLM server uses have the memory its
``gpu_mem_use`` share asks for, and that share holds the model (issue 15 item 3).

One command (:func:`read_gpu_fit`) prints ``nvidia-smi``'s free and total memory per GPU, the
model's ``config.json`` and the size of its weight files; :class:`GpuMemoryFit` judges them:

- each GPU of the server (its ``gpu_ids``) has ``gpu_mem_use`` x its total free, else vLLM exits
  at start ("Free memory on device ... is less than desired GPU memory utilization"). The server
  being replaced in place (a unit of that name runs now) stops before the new one starts: the
  memory it holds, up to the new share, counts as free. ``beside``: the new server starts next to
  the old one (a replace without downtime), nothing is counted back;
- the "will it fit" estimate (:func:`pyalbert.image.preflight.estimate`): weights plus a KV cache
  of ``max_model_len`` tokens over ``tensor_parallel_size`` GPUs within ``gpu_mem_use`` x the
  smallest of those GPUs. A config.json without the shape keys skips the estimate.

Pure but the command; tested on captured ``nvidia-smi`` output.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pyalbert.commands import gpu
from pyalbert.commands.base import Cmd
from pyalbert.errors import AlbertError
from pyalbert.image.preflight import GiB, ModelMetadata, estimate
from pyalbert.remote import Result
from pyalbert.runtimes.checks import Check, HostFacts
from pyalbert.runtimes.model_args import parse_config

MARK = "@@albert-gpu-fit"


def read_gpu_fit(model_dir: str) -> Cmd:
    """``nvidia-smi``'s memory per GPU and its exit code, config.json, the weight files' sizes."""
    d = shlex.quote(model_dir)
    script = (f"{gpu.free_memory().render()} 2>&1; echo \"{MARK} smi $?\"; "
              f"cat {d}/config.json 2>/dev/null; echo; echo \"{MARK} weights\"; "
              f"find -L {d} -maxdepth 1 -name '*.safetensors' -printf '%s\\n' 2>/dev/null; true")
    return Cmd.of("sh", "-c", script)


@dataclass(frozen=True)
class GpuFitFacts:
    smi_exit: int
    smi_output: str
    #: {gpu index: (free MiB, total MiB)}
    memory: dict[int, tuple[int, int]]
    config: dict | None
    weight_bytes: int | None


def parse_gpu_fit(stdout: str) -> GpuFitFacts:
    smi, _, rest = stdout.partition(f"{MARK} smi ")
    code_line, _, rest = rest.partition("\n")
    config_text, _, weights = rest.partition(f"{MARK} weights")
    sizes = [int(line) for line in weights.split() if line.isdigit()]
    code = code_line.strip()
    return GpuFitFacts(smi_exit=int(code) if code.isdigit() else 127, smi_output=smi.strip(), memory=gpu.parse_free_memory(smi),
                       config=parse_config(config_text.strip()), weight_bytes=sum(sizes) or None)


def memory_problems(facts: GpuFitFacts, gpu_ids: tuple[int, ...], share: float,
                    held_by_replaced: bool) -> list[str]:
    """GPUs of the server without ``share`` of their total free (one phrase each)."""
    out = []
    for g in gpu_ids:
        if g not in facts.memory:
            out.append(f"GPU {g} is not listed by nvidia-smi (it lists {sorted(facts.memory) or 'none'})")
            continue
        free, total = facts.memory[g]
        wanted = int(share * total)
        credit = min(wanted, total - free) if held_by_replaced else 0
        if free + credit < wanted:
            counted = f" + {credit} MiB the server being replaced frees" if credit else ""
            out.append(f"GPU {g}: {free} MiB free{counted}, {wanted} MiB needed "
                       f"(gpu_mem_use {share:g} x {total} MiB)")
    return out


@dataclass(frozen=True)
class GpuMemoryFit(Check):
    """The GPUs' free memory and the model's size against the unit's ``gpu_mem_use`` share."""

    model_id: str
    #: the names the server being replaced may run under (its slots)
    units: tuple[str, ...]
    model_dir: str
    gpu_ids: tuple[int, ...]
    gpu_mem_use: float
    max_model_len: int | None
    quantization: str | None = None
    extra_args: tuple[str, ...] = ()
    #: the new server starts beside the old one (it frees nothing before the start)
    beside: bool = False

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"{self.model_id}: GPU memory on GPU(s) {','.join(map(str, self.gpu_ids))}"

    @property
    def cmd(self) -> Cmd:
        return read_gpu_fit(self.model_dir)

    def judge(self, res: Result, host: HostFacts) -> str | None:
        facts = parse_gpu_fit(res.stdout)
        where = f"routing-table entry '{self.model_id}'"
        if facts.smi_exit != 0 or not facts.memory:
            last = (facts.smi_output.splitlines() or ["no output"])[-1][:200]
            return (f"model {self.model_id}: nvidia-smi does not answer (exit {facts.smi_exit}: "
                    f"{last}), so the free GPU memory cannot be checked. Fix: install the NVIDIA "
                    f"driver on the host (`fab provision`), or set gpus = 0 for a CPU host.")
        replaced = not self.beside and bool(set(self.units) & host.running_units())
        short = memory_problems(facts, self.gpu_ids, self.gpu_mem_use, replaced)
        if short:
            return (f"model {self.model_id}: not enough free GPU memory ({'; '.join(short)}); vLLM "
                    f"would exit at start. Fix: stop what uses the GPU (`nvidia-smi` shows which "
                    f"process), or lower gpu_mem_use in the {where}.")
        return self._will_not_fit(facts, where)

    def _will_not_fit(self, facts: GpuFitFacts, where: str) -> str | None:
        if facts.config is None:
            return None
        smallest = min(facts.memory[g][1] for g in self.gpu_ids)
        try:
            est = estimate(ModelMetadata(facts.config, facts.weight_bytes, self.model_dir),
                           gpu_memory_gb=smallest * 1024**2 / GiB,
                           gpu_memory_utilization=self.gpu_mem_use,
                           tensor_parallel_size=len(self.gpu_ids),
                           max_model_len=self.max_model_len, quantization=self.quantization,
                           extra_args=self.extra_args, model=self.model_id)
        except AlbertError:  # a config.json without the shape keys: no estimate
            return None
        if est.fits:
            return None
        return (f"model {self.model_id} will not fit in its GPU memory share: {est.summary()}. "
                f"Fix: in the {where} raise gpu_mem_use or tensor_parallel_size, lower "
                f"max_model_len, or use a quantized checkpoint (awq/gptq).")

