"""Learning without forgetting (Li & Hoiem 2016): distil the previous model on the new data (any model kind)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_positive
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Strategy, StrategyConfig
from cl_runner.strategies.common import local, tensor_bytes
from cl_runner.strategies.distill import distillation_kl
from cl_runner.strategies.memory import refuse_state_unless_fits, teacher_bytes
from cl_runner.strategies.support import Refused, Supports


@dataclass
class LwFConfig(StrategyConfig):
    name: str = "lwf"
    alpha: float = 1.0  # weight of the distillation term
    temperature: float = 2.0  # softmax temperature of teacher and student

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.alpha", self.alpha, allow_zero=True)
        check_positive(errs, f"{key}.temperature", self.temperature)
        return errs


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy in eval mode with no parameter requiring grad (the teacher): a deep copy, or under FSDP a copy
    sharded like ``model`` (``sharded_copy``). Under DDP ``model`` is the bare module: each rank copies it whole."""
    from torch.distributed.fsdp import FSDPModule

    teacher = (sharded_copy(model) if isinstance(model, FSDPModule) else copy.deepcopy(model)).eval()
    teacher.requires_grad_(False)
    return teacher


def sharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the FSDP2-sharded ``model`` (which cannot be deep-copied), sharded like it: a new module of its
    class built on the meta device from its config, ``fully_shard``-ed unit by unit as ``model`` is (same mesh,
    mixed-precision and offload policies), then each rank copies its own shards and the buffers. No rank ever holds
    the whole model. Needs a class built from ``model.config`` (Hugging Face models are)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    sources = dict(model.named_parameters())
    first = next(iter(sources.values()))
    with torch.device("meta"):
        teacher = cls(model.config).to(first.dtype)
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    for name, unit in sorted(units, key=lambda u: (u[0] == "", -u[0].count("."))):  # inner units first, root last
        fully_shard(teacher.get_submodule(name), mesh=first.device_mesh, **_unit_options(unit))
    teacher.to_empty(device=local(first).device)
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            local(param).copy_(local(sources[name]))
        buffers = dict(model.named_buffers())
        for name, buffer in teacher.named_buffers():
            buffer.copy_(buffers[name])
    return teacher


def _unit_options(unit: torch.nn.Module) -> dict[str, Any]:
    """The mixed-precision and offload policies ``unit`` was sharded with (FSDP2 keeps them per parameter group);
    the teacher never runs backward, so it always frees gathered weights after its forward."""
    state = getattr(unit, "_get_fsdp_state", lambda: None)()  # torch's own (private) record of the options
    groups = getattr(state, "_fsdp_param_groups", None) or []
    options: dict[str, Any] = {"reshard_after_forward": True}
    if groups:
        options |= {"mp_policy": groups[0].mp_policy, "offload_policy": groups[0].offload_policy}
    return options


class LwF(Strategy):
    """``loss + alpha * T^2 * KL(teacher_T || student_T)``, averaged over the batch's target tokens.

    The teacher is a frozen copy of the model taken in ``after_task`` (best weights restored), so task i is
    trained against the model as it was after task i - 1; the first task has no teacher and trains plainly.
    The teacher runs under ``torch.no_grad`` and ``ctx.autocast()`` on the same inputs as the student. The
    ``T^2`` factor keeps the gradient scale of the soft targets independent of T (Hinton et al. 2015).
    """

    name = "lwf"
    Config = LwFConfig
    supports = Supports(pack=Refused("its loss hook runs the teacher on the batch's rows"))

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.teacher: torch.nn.Module | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # teacher weights loaded before a model exists

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        return StateNeeds(sharded_bytes=size.parameters * size.param_bytes)  # the teacher

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        model_bytes = tensor_bytes([*ctx.model.parameters(), *ctx.model.buffers()])
        refuse_state_unless_fits(ctx.model, ctx.device, teacher_bytes(model_bytes), "LwF's teacher (a frozen copy "
                                 "of the model)", "model.dtype", "load the model in bfloat16 or use a smaller model")

    def after_task(self, ctx: Context) -> None:
        self.teacher, self._pending = frozen_copy(ctx.model), None

    def loss(
        self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor
    ) -> torch.Tensor:
        teacher = self._teacher(ctx)
        if teacher is None or self.cfg.alpha == 0:
            return loss
        with torch.no_grad(), ctx.autocast():
            teacher_out = teacher(**ctx.kind.model_inputs(batch))  # an encoder-decoder's: the decoder logits
        temperature = self.cfg.temperature
        kl = distillation_kl(outputs.logits, teacher_out.logits, batch["labels"], temperature)
        ctx.log(lwf_kl=kl.detach())
        return loss + self.cfg.alpha * temperature**2 * kl

    def _teacher(self, ctx: Context) -> torch.nn.Module | None:
        if self._pending is not None:  # resumed: rebuild the teacher on the model's architecture and device
            self.teacher = frozen_copy(ctx.model)
            self.teacher.load_state_dict(self._pending)
            self._pending = None
        return self.teacher

    def accounting(self) -> dict[str, Any]:
        if self.teacher is None:
            return {"teacher_bytes": 0, "teacher_parameters": 0}
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]  # tied weights counted once
        return {"teacher_bytes": tensor_bytes(tensors),
                "teacher_parameters": sum(p.numel() for p in self.teacher.parameters())}

    def state_dict(self) -> dict[str, Any]:
        weights = self._pending if self.teacher is None else self.teacher.state_dict()
        return {"teacher": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher, self._pending = None, state["teacher"]
