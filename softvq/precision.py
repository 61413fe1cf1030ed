"""The compute precisions the tokenizer runs in (``Tokenizer.enable_autocast``, the CLI's
``--precision``), and whether this CPU computes them in hardware."""

from __future__ import annotations

import torch

# Names accepted for a compute precision.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_matrix_instructions(precision: str) -> bool:
    """Whether this CPU computes ``precision`` ("bf16", "fp16") in hardware (AMX or AVX512-BF16/FP16);
    without, torch emulates it, over 10x slower than fp32 on a 2048^3 matmul."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get(f"amx_{precision}") or caps.get(f"avx512_{precision}"))
