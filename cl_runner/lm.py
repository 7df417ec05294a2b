"""The one convention every part shares for a causal-LM batch and its loss.

An encoded example is a dict ``{"input_ids": [...], "labels": [...], "task_id": int}`` of Python ints, with
``labels`` aligned to ``input_ids`` and ``-100`` on prompt positions (no loss there). A collated batch holds
right-padded tensors ``input_ids``, ``attention_mask``, ``labels`` (B, L) and ``task_ids`` (B,). The model at
position t predicts token t + 1, so the loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``.
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F

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
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, L-1) bool mask of the positions whose next token is a target token."""
    return labels[:, 1:] != IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood (B, L-1) of the next token, zero where there is no target."""
    shifted = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        shifted.reshape(-1).clamp_min(0),
        reduction="none",
    ).view(shifted.shape)
    return nll * target_mask(labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over target tokens only (prompt and padding masked)."""
    mask = target_mask(labels)
    return token_nll(logits, labels).sum() / mask.sum().clamp_min(1)
