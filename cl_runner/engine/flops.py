"""Model FLOPs utilisation (MFU): the training FLOPs a step does per token against the device's peak.

``flops_per_token`` follows the usual 6N estimate (Kaplan et al. 2020, PaLM's MFU): per token a forward pass
costs 2 FLOPs per parameter and the backward pass 4, of which 2 compute the activations' gradients (through
every parameter) and 2 the weights' gradients (trainable parameters only). So a fully trained model costs
``6 N`` and a frozen model with adapters ``4 N + 2 N_trainable``. Attention's sequence-length term and the
extra passes a strategy makes (a teacher, LAMOL's generation pass) are not counted: MFU is a lower bound.

Peaks are dense (no sparsity) bf16/fp16 tensor-core FLOP/s from NVIDIA's data sheets, matched on the device
name; a run in fp32 (TF32) is still measured against that peak. CPUs and unknown devices have none (None).
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name, dense bf16/fp16 FLOP/s); the first match wins (specific names first)
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.75e15),
    ("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A6000", 155e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's peak dense bf16/fp16 FLOP/s, or None (CPU, MPS, a GPU not in ``PEAK_FLOPS``)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    return next((peak for key, peak in PEAK_FLOPS if key.lower() in name.lower()), None)


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token: ``4 N + 2 N_trainable`` (``6 N`` when every parameter trains)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return 4.0 * total + 2.0 * trainable


def mfu(flops: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Achieved FLOP/s (``flops`` per token x tokens/s) over ``peak``; None without a peak."""
    return None if peak is None else flops * tokens_per_s / peak
