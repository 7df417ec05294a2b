"""Knowledge-distillation loss between two causal LMs' next-token distributions, on target positions only."""

from __future__ import annotations

import torch

from cl_runner.models.lm import target_mask


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over target positions of ``KL(softmax(teacher / T) || softmax(student / T))`` (fp32).

    Positions follow ``cl_runner.models.lm``: logits at t predict token t + 1, so ``logits[:, :-1]`` is compared
    where ``labels[:, 1:] != -100``. Only those rows are gathered before the softmax, which bounds memory by
    the number of target tokens rather than batch x length x vocabulary. Zero when there is no target token.
    """
    F = torch.nn.functional
    mask = target_mask(labels)
    student = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="sum", log_target=True)
    return kl / mask.sum().clamp_min(1)
