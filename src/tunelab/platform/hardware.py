"""The machine decides the defaults: which device trains, at which precision; and whether the chosen
trainer can run here at all, before anything slow starts.

`trainer.accelerator=auto` is the GPU when one is visible, else the CPU. `trainer.precision=auto` is
the fastest precision that keeps training correct on that device:

- CUDA: bf16-mixed where the card computes bf16 (Ampere and newer), else 16-mixed.
- CPU: bf16-mixed only where bf16 matmul is clearly faster than fp32 here, else 32-true. On AVX2-only
  CPUs torch emulates bf16 and it runs ~60x slower than fp32; CPUs that report avx512_bf16 without
  AMX still ran bf16 matmul at 0.5-0.8x fp32 (benchmarks/RESULTS.md), so the flag alone is not
  enough: where it is present, one small matmul of each dtype is timed once per machine and cached.
  TUNELAB_CPU_BF16_SPEEDUP=X stands in for both checks (X: bf16 matmul speed / fp32's on this CPU, as
  the probe would measure it; ~0.017 is an AVX2-only CPU): the test suite pins `auto` with it, so no
  test depends on the CPU it runs on, and a what-if run can take either branch on any machine.
- MPS and others: 32-true (mixed precision there is not tested by this project).
An explicit precision always wins; bf16 on a CPU without native bf16 gets one warning line.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import platform
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, open_dict

from tunelab.config.checks import UNLIMITED
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

AUTO = "auto"
# bf16 must beat fp32 matmul by this much before bf16-mixed is chosen on a CPU: autocast adds a cast
# of every weight and activation per step, which a small matmul gain does not pay for.
CPU_BF16_MIN_SPEEDUP = 1.5
SPEEDUP_ENV = "TUNELAB_CPU_BF16_SPEEDUP"
BF16_SPELLINGS = ("bf16", "bf16-mixed", "bf16-true", "bfloat16")
HALF_SPELLINGS = ("16", "16-mixed", "16-true", "fp16", "float16")


@dataclass(frozen=True)
class Choice:
    value: str
    reason: str


def cuda_visible() -> bool:
    return torch.cuda.is_available()


def mps_visible() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def cpu_capability() -> str:
    """torch's ATen dispatch level (DEFAULT, AVX2, AVX512, ...); ATEN_CPU_CAPABILITY lowers it."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_bf16_instructions() -> bool:
    """Whether this CPU has bf16 instructions torch can use (avx512_bf16 or AMX) at its dispatch level."""
    if not cpu_capability().startswith("AVX512"):
        return False
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_model_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_seconds(dtype: torch.dtype, size: int = 512, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # first call pays for kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return best


def probe_key() -> str:
    """What the cached probe is keyed by: the CPU (name, dispatch level, bf16 instructions), torch, threads.
    Cloud CPUs of different generations can share a model name, so the instructions are part of the key."""
    return (f"{cpu_model_name()}|{cpu_capability()}|native bf16 {cpu_bf16_instructions()}"
            f"|torch {torch.__version__}|threads {torch.get_num_threads()}")


def cpu_bf16_speedup() -> float:
    """fp32 matmul time / bf16 matmul time on this CPU at this thread count, measured once and cached."""
    from tunelab.paths import cache_dir

    key = probe_key()
    path = cache_dir() / "cpu_bf16_speedup.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = matmul_seconds(torch.float32) / matmul_seconds(torch.bfloat16)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two runs starting at once each write their own
        tmp.write_text(json.dumps(cached, indent=1) + "\n")
        tmp.replace(path)
    return float(cached[key])


def pinned_speedup() -> float | None:
    """TUNELAB_CPU_BF16_SPEEDUP, when set: the probe's answer given instead of measured."""
    text = os.environ.get(SPEEDUP_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise TunelabError(f"{SPEEDUP_ENV}={text} is not a number; give bf16 matmul speed relative to fp32 "
                           f"(e.g. {SPEEDUP_ENV}=0.5), or unset it to measure") from None
    if not value > 0:
        raise TunelabError(f"{SPEEDUP_ENV}={text} must be > 0 (bf16 matmul speed relative to fp32)")
    return value


def cpu_precision() -> Choice:
    pinned = pinned_speedup()
    if pinned is not None:
        chosen = "bf16-mixed" if pinned >= CPU_BF16_MIN_SPEEDUP else "32-true"
        return Choice(chosen, f"{SPEEDUP_ENV}={pinned:g} says bf16 matmul runs {pinned:g}x fp32 (not measured)")
    if not cpu_bf16_instructions():
        return Choice("32-true", f"this CPU has no native bf16 ({cpu_capability()}): bf16 would run many times slower")
    speedup = cpu_bf16_speedup()
    if speedup >= CPU_BF16_MIN_SPEEDUP:
        return Choice("bf16-mixed", f"native bf16 on this CPU: bf16 matmul {speedup:.1f}x fp32")
    return Choice("32-true", f"this CPU has bf16 instructions but bf16 matmul measured {speedup:.2f}x fp32")


def resolve_accelerator(requested: str | None) -> str:
    requested = str(requested or AUTO)
    if requested != AUTO:
        return requested
    if cuda_visible():
        return "gpu"
    return "mps" if mps_visible() else "cpu"


def is_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda")


@functools.lru_cache(maxsize=None)
def auto_precision(accelerator: str) -> Choice:
    """The precision `auto` means on this accelerator (cached: it never changes within a process)."""
    if is_cuda(accelerator):
        if torch.cuda.is_bf16_supported():
            return Choice("bf16-mixed", f"{torch.cuda.get_device_name()} computes bf16")
        return Choice("16-mixed", f"{torch.cuda.get_device_name()} has no bf16: fp16 with loss scaling")
    if accelerator == "cpu":
        return cpu_precision()
    return Choice("32-true", f"mixed precision on {accelerator} is not tested by tunelab")


def resolve_precision(requested, accelerator: str) -> Choice:
    requested = str(requested if requested is not None else AUTO)
    if requested == AUTO:
        return auto_precision(accelerator)
    if accelerator == "cpu" and requested in BF16_SPELLINGS and not cpu_bf16_instructions():
        log.warning("trainer.precision=%s on a CPU without native bf16 (%s) runs many times slower than fp32; "
                    "use trainer.precision=auto (or 32-true)", requested, cpu_capability())
    return Choice(requested, "set explicitly")


def autocast_dtype(precision: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a precision means for computation on `device` (None: no autocast).

    `auto` resolves as for training on that device, so evaluation, generation and rollouts run at the
    precision the run trains at."""
    if precision is None:
        return None
    precision = str(precision)
    if precision == AUTO:
        precision = auto_precision("gpu" if device.type == "cuda" else device.type).value
    if precision in BF16_SPELLINGS:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16  # torch refuses bf16 autocast on such GPUs (T4, V100); fp16 is their mixed precision
        return torch.bfloat16
    if precision in HALF_SPELLINGS and device.type == "cuda":
        return torch.float16
    return None


def resolve_trainer(cfg: DictConfig) -> None:
    """Write the concrete accelerator, precision and epoch limit into the config, so what is saved is what ran."""
    trainer = cfg.trainer
    accelerator = resolve_accelerator(trainer.get("accelerator"))
    precision = resolve_precision(trainer.get("precision"), accelerator)
    with open_dict(cfg):
        trainer.accelerator = accelerator
        trainer.precision = precision.value
        if (trainer.get("max_steps") or UNLIMITED) > 0:
            # A step budget is the budget: Lightning stops at whichever limit comes first, and the default
            # max_epochs: 1 silently cut trainer.max_steps=40 to the 8 steps of one epoch.
            trainer.max_epochs = UNLIMITED
    log.info("device: %s, precision: %s (%s)", accelerator, precision.value, precision.reason)


def training_device(trainer_cfg) -> torch.device:
    """Where Lightning will put the model (rank 0's device): the base model is evaluated there too."""
    return torch.device("cuda" if is_cuda(resolve_accelerator(trainer_cfg.get("accelerator"))) else "cpu")


def check_trainer(trainer_cfg) -> None:
    accelerator = str(trainer_cfg.get("accelerator", AUTO))
    strategy = str(trainer_cfg.get("strategy", AUTO))
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise TunelabError("trainer=deepspeed needs the deepspeed package: pip install deepspeed (and a GPU)")
    if strategy.startswith("fsdp") and not cuda_visible():
        # Lightning's FSDPStrategy (FSDP1) raises "requires a GPU accelerator"; tunelab's FSDP2 strategy does not.
        raise TunelabError(f"trainer.strategy={strategy} is Lightning's FSDP1 strategy, which needs a CUDA GPU; "
                           "trainer=fsdp (FSDP2, tunelab.platform.sharding) also runs on CPU processes")
    if is_cuda(accelerator) and not cuda_visible():
        raise TunelabError(f"trainer asks for accelerator={accelerator} but no CUDA GPU is visible; "
                           "use trainer=cpu (or trainer=ddp for several CPU processes)")
