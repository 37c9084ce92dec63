"""The machine's matmul peak, measured here, and the useful FLOPs of a training step (for MFU)."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def cpu_kind() -> str:
    """What decides CPU speed: torch's dispatch level and whether bf16 is native (benchmarks name it)."""
    from tunelab.platform import hardware

    return (f"capability {hardware.cpu_capability()}, native bf16 {hardware.cpu_bf16_instructions()}, "
            f"tunelab auto precision {hardware.auto_precision('gpu' if torch.cuda.is_available() else 'cpu').value}")


def compute_dtype() -> str:
    """The matmul dtype tunelab trains at here (trainer.precision=auto), whose peak MFU is measured against."""
    from tunelab.platform import hardware

    precision = hardware.auto_precision("gpu" if torch.cuda.is_available() else "cpu").value
    return "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else "float32"


def matmul_peak(size: int = 1024, repeats: int = 30, dtypes: tuple[str, ...] = ("bfloat16", "float32"),
                budget_s: float = 10.0) -> dict[str, float]:
    """Best FLOP/s of a square matmul per dtype: the best of several, so contention shows least. A dtype
    that the CPU only emulates (bf16 on AVX2: ~1 GFLOP/s) stops after `budget_s` seconds of trying."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = {}
    for dtype in (getattr(torch, name) for name in dtypes):
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        a @ b  # warm-up (oneDNN picks its kernel)
        best, began = float("inf"), time.perf_counter()
        for _ in range(repeats):
            if time.perf_counter() - began > budget_s:
                break
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        peak[str(dtype).removeprefix("torch.")] = 2 * size**3 / best
    return peak


def model_shape(config) -> dict[str, int]:
    text = config.get_text_config()
    layers, hidden = text.num_hidden_layers, text.hidden_size
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * text.intermediate_size
    return {"layers": layers, "hidden": hidden, "attn_dim": heads * head_dim, "body": layers * per_layer,
            "vocab": text.vocab_size}


def step_flops(shape: dict, lengths: list[int], supervised: int, full: bool, lora_params: int = 0) -> float:
    """Useful FLOPs of one optimizer step: what the objective needs, not what an implementation spends.

    Forward: 2 x body params per real (non-pad) token, causal attention scores and mixing, and the LM
    head at the supervised positions only. Backward: 2x forward (input and weight grads) for full
    fine-tuning; for LoRA the frozen weights need input grads only (1x forward) plus 6 x LoRA params
    per token. Recomputation (checkpointing) and padding are not useful work and are not counted.
    """
    tokens = sum(lengths)
    attention = sum(2 * n * n * shape["attn_dim"] for n in lengths) * shape["layers"]  # QK^T and AV, causal half
    forward = 2 * shape["body"] * tokens + attention + 2 * shape["hidden"] * shape["vocab"] * supervised
    if full:
        return 3 * forward
    return 2 * forward + 6 * lora_params * tokens
