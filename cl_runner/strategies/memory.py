"""What a strategy's own state and estimation passes cost in memory, sized from the model and the device's free
memory: plain functions of parameter counts (a memory plan can call them without building a strategy), the free
memory of a device, the automatic batch of a per-example-gradient pass, and the up-front refusal.

Estimation passes (EWC's Fisher, MAS's importance) take per-example gradients ``batch`` examples at a time: each
example holds a gradient of every selected parameter (``per_example_gradient_bytes``). ``auto`` picks the largest
batch, at most ``AUTO_MAX_BATCH`` (the old fixed default, so the same values come out wherever it fits), whose
per-example gradients take at most ``PASS_FRACTION`` of the memory free when the pass starts (the rest is left to
the activations and to everything else on the machine). Before training, ``refuse_unless_fits`` refuses a run
whose strategy state plus its smallest pass plus the optimizer's state cannot fit in the free memory at all, in
one line naming the option to lower.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from cl_runner.core.dist import world
from cl_runner.core.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
AUTO_MAX_BATCH = 16  # the old fixed default: where it fits, auto gives the values the fixed 16 gave
PASS_FRACTION = 0.5  # share of the free memory an automatic pass's per-example gradients may take
GIB = 2**30
# strategy options that bound a strategy's own memory, named by the out-of-memory line (engine/run.py)
MEMORY_OPTIONS = ("fisher_batch_size", "mas_batch_size", "ref_batch_size", "replay_batch_size", "max_basis_mb")


# ------------------------------------------------------------------------------------------- options
def parse_batch(value: Any) -> int | None:
    """An estimation batch option: ``auto`` -> None, a positive integer (or its string) -> the integer; anything
    else raises ValueError."""
    if str(value).strip().lower() == AUTO:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected auto or a positive integer, got {value!r}")
    return int(text)


def check_batch(errors: list[str], key: str, value: Any) -> None:
    try:
        parse_batch(value)
    except ValueError as exc:
        errors.append(f"{key}: {exc}")


# ------------------------------------------------------------------------------------------- free memory
def free_bytes(device: torch.device | str | None) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory (``torch.cuda.mem_get_info``), else the host's
    MemAvailable (/proc/meminfo; psutil where there is none); None where it cannot be told (or no device)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


# ------------------------------------------------------------------------------------------- estimates
def numel_and_itemsize(params: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(elements, bytes per element of the widest) of ``params``."""
    params = list(params)
    return sum(p.numel() for p in params), max((p.element_size() for p in params), default=4)


def per_example_gradient_bytes(numel: int, itemsize: int = 4) -> int:
    """One example of a batched per-example-gradient pass (fisher.py's ``_batched_sums``): its gradient in the
    parameters' dtype, the fp32 copy where that is not fp32, and the transformed (squared/absolute) fp32 copy."""
    return numel * (itemsize + (0 if itemsize == 4 else 4) + 4)


def optimizer_bytes(numel: int, itemsize: int = 4) -> int:
    """AdamW's two moments and the gradient of ``numel`` trainable elements (loop.make_optimizer)."""
    return 3 * numel * itemsize


def anchor_state_bytes(numel: int, state_itemsize: int = 4) -> int:
    """EWC / MAS / SI's stored state (anchor.py): the importance and the anchor, pre-summed over tasks."""
    return 2 * numel * state_itemsize


def estimation_bytes(numel: int, itemsize: int = 4, batch: int = 1) -> int:
    """EWC's Fisher / MAS's importance pass of ``batch`` examples: their per-example gradients and the fp32 sum."""
    return batch * per_example_gradient_bytes(numel, itemsize) + 4 * numel


def gradient_memory_bytes(numel: int, tasks: int, itemsize: int = 4) -> int:
    """GEM: one reference gradient per earlier task, held at once in the last task's steps."""
    return max(tasks - 1, 0) * numel * itemsize


def ogd_basis_bytes(numel: int, tasks: int, directions_per_task: int, max_basis_mb: float,
                    state_itemsize: int = 4) -> int:
    """OGD: the stored basis at the last task, capped by ``max_basis_mb``."""
    return min(max(tasks - 1, 0) * directions_per_task * numel * state_itemsize, int(max_basis_mb * 2**20))


def teacher_bytes(model_bytes: int) -> int:
    """LwF: a frozen copy of the model (weights and buffers)."""
    return model_bytes


def der_logits_bytes(buffer_size: int, target_positions: int, vocab: int, top_k: int | None,
                     logit_itemsize: int = 4) -> int:
    """DER: the stored logits of a full buffer, ``target_positions`` target tokens per example on average (der.py's
    ``stored_logits``: all V logits, or the k largest and their int64 indices)."""
    per_position = vocab * logit_itemsize if top_k is None else min(top_k, vocab) * (logit_itemsize + 8)
    return buffer_size * target_positions * per_position


def merge_state_bytes(numel: int, state_itemsize: int = 4, copies: int = 3) -> int:
    """merge: the base weights, the running merge of task vectors and (``when=end``) the latest task vector."""
    return copies * numel * state_itemsize


# ------------------------------------------------------------------------------------------- decisions
def auto_batch(per_example: int, free: int | None, cap: int = AUTO_MAX_BATCH) -> int:
    """The largest batch up to ``cap`` whose per-example gradients take at most ``PASS_FRACTION`` of ``free``
    (``cap`` where the free memory is unknown); at least 1."""
    if free is None or per_example <= 0:
        return cap
    return max(1, min(cap, int(PASS_FRACTION * free // per_example)))


def estimation_batch(option: Any, params: Iterable[torch.Tensor], device: torch.device | str) -> int:
    """The batch of one estimation pass: the option's number, or with ``auto`` ``auto_batch`` on the memory free
    now (logged when it is below ``AUTO_MAX_BATCH``)."""
    fixed = parse_batch(option)
    if fixed is not None:
        return fixed
    numel, itemsize = numel_and_itemsize(params)
    free = free_bytes(device)
    batch = auto_batch(per_example_gradient_bytes(numel, itemsize), free)
    if batch < AUTO_MAX_BATCH:
        log.info("estimation batch auto: %d examples (%.2f GiB of per-example gradients each, %.1f GiB free)",
                 batch, per_example_gradient_bytes(numel, itemsize) / GIB, (free or 0) / GIB)
    return batch


def refuse_unless_fits(need: int, device: torch.device | str | None, what: str, key: str, advice: str) -> None:
    """``ConfigError`` (one line: ``key``, the option to change, what needs how much, ``advice``) when ``need``
    bytes exceed the memory free on ``device`` now; nothing where the free memory cannot be told."""
    free = free_bytes(device)
    if free is not None and need > free:
        raise ConfigError(f"{key}: {what} need ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB is free on "
                          f"{torch.device(device).type}; {advice}")


def refuse_state_unless_fits(model: torch.nn.Module, device: torch.device | str | None, state: int, what: str, key: str,
                             advice: str) -> None:
    """``refuse_unless_fits`` for a strategy's ``state`` bytes plus AdamW's state of ``model``'s trainable
    parameters (which the loop allocates later); skipped under FSDP, where each rank holds shards."""
    if world().sharded:
        return
    trainable = numel_and_itemsize(p for p in model.parameters() if p.requires_grad)
    refuse_unless_fits(state + optimizer_bytes(*trainable), device, f"{what} and AdamW's state", key, advice)
