"""The one convention every part shares for a causal-LM batch and its loss.

An encoded example is a dict ``{"input_ids": [...], "labels": [...], "task_id": int}`` of Python ints, with
``labels`` aligned to ``input_ids`` and ``-100`` on prompt positions (no loss there). A collated batch holds
right-padded tensors ``input_ids``, ``attention_mask``, ``labels`` (B, L) and ``task_ids`` (B,). The model at
position t predicts token t + 1, so the loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import torch

IGNORE_INDEX = -100


class Encoded(TypedDict):
    input_ids: list[int]
    labels: list[int]
    task_id: int


def collate(examples: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch of tensors on ``device``."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    task_ids = torch.tensor([e["task_id"] for e in examples], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": task_ids}
    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    # page-locked host memory (torch's caching host allocator) makes the copy truly asynchronous: with no host
    # sync in the loop, the next batch is built while the GPU still runs the current step
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def target_count(example: Encoded) -> int:
    """How many target positions ``target_mask`` finds in ``example`` once collated, counted on the host."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def token_counts(examples: list[Encoded]) -> tuple[int, int]:
    """(tokens, target tokens) of ``examples``: every real token (prompt and target, no padding), and the
    positions the loss is computed on (``target_count``), counted on the host."""
    return sum(len(e["input_ids"]) for e in examples), sum(target_count(e) for e in examples)


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, L-1) bool mask of the positions whose next token is a target token."""
    return labels[:, 1:] != IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood (B, L-1) of the next token, zero where there is no target."""
    shifted = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        shifted.reshape(-1).clamp_min(0),
        reduction="none",
    ).view(shifted.shape)
    return nll * target_mask(labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over target tokens only (prompt and padding masked).

    With ``chunk_tokens`` the fp32 log-softmax is computed over about that many positions at a time and
    recomputed in backward (activation checkpointing), so the loss's own memory no longer grows with
    batch x length x vocabulary; the logits the model returns (and their gradient) still do. Same value and
    gradient up to float rounding (a sum in another order).
    """
    mask = target_mask(labels)
    if chunk_tokens is None:
        return token_nll(logits, labels).sum() / mask.sum().clamp_min(1)
    width, positions = max(1, chunk_tokens // logits.size(0)), logits.size(1) - 1
    total = sum(torch.utils.checkpoint.checkpoint(_summed_nll, logits[:, p : min(p + width, positions)],
                                                  labels[:, p + 1 : min(p + width, positions) + 1],
                                                  use_reentrant=False)
                for p in range(0, positions, width))
    return total / mask.sum().clamp_min(1)


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def pack(examples: list[Encoded], max_length: int,
         collate: Callable[[list[Encoded]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``examples`` concatenated into rows of at most ``max_length`` tokens (first fit, in order), collated.

    Each example keeps its own targets: the first label of every example is ``IGNORE_INDEX`` (as unpacked, where
    position 0 is never a target), so no token predicts the next example's first token and the sum of the loss
    and the target count equal the unpacked batch's. ``position_ids`` restart at 0 for every example and for the
    padding at the end of a row. Call the model with them, ``attention_mask=None`` and ``use_cache=False`` (with a
    cache or a padding mask transformers skips the detection): its packed-sequence detection
    (``masking_utils.find_packed_sequence_indices``) keeps each example's attention inside the example.
    ``task_ids`` holds the first example's task per row. A pure function of ``examples``.
    """
    rows = [[examples[i] for i in row] for row in pack_rows([len(e["input_ids"]) for e in examples], max_length)]
    merged: list[Encoded] = [{"input_ids": [t for e in row for t in e["input_ids"]],
                              "labels": [t for e in row for t in [IGNORE_INDEX, *e["labels"][1:]]],
                              "task_id": row[0]["task_id"]} for row in rows]
    batch = collate(merged)
    width = batch["input_ids"].size(1)
    positions = [[p for e in row for p in range(len(e["input_ids"]))] for row in rows]
    position_ids = torch.tensor([p + list(range(width - len(p))) for p in positions], dtype=torch.long)
    device = batch["input_ids"].device
    batch["position_ids"] = (position_ids.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
                             else position_ids.to(device))
    return batch


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped first fit, in order, into rows of at most ``max_length`` (a longer one alone)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        row = next((r for r, free in enumerate(room) if n <= free), None)
        if row is None:
            rows.append([i])
            room.append(max_length - n)
        else:
            rows[row].append(i)
            room[row] -= n
    return rows
