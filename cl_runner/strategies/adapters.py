"""Model extension with LoRA adapters: a new adapter per task over a frozen base (``adapters``, optionally
O-LoRA's orthogonality penalty), or one adapter trained through the whole sequence (``shared_lora``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cl_runner.core.checks import check_fraction, check_positive
from cl_runner.core.dist import world
from cl_runner.strategies.base import (
    Context,
    ModelSize,
    StateNeeds,
    Strategy,
    StrategyConfig,
    Takeaway,
    not_made_before_sharding,
)
from cl_runner.strategies.common import tensor_bytes
from cl_runner.strategies.lora import (
    activate,
    add_lora,
    check_targets,
    count,
    lora_a_pairs,
    lora_parameters,
    lora_size,
    subspace_overlap,
    train_only,
)
from cl_runner.strategies.support import Refused, Supports

INIT_SALT = 31  # ctx.seed_for salt of a new adapter's initialisation


@dataclass
class SharedLoRAConfig(StrategyConfig):
    name: str = "shared_lora"
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA scaling: the update is B A x * alpha / rank
    dropout: float = 0.0  # dropout on the LoRA input
    target_modules: list[str] | None = None  # module names (or suffixes) to adapt; null = every linear but the head

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.rank", self.rank)
        check_positive(errs, f"{key}.alpha", self.alpha)
        check_fraction(errs, f"{key}.dropout", self.dropout, closed_right=False)
        if self.target_modules is not None and not self.target_modules:
            errs.append(f"{key}.target_modules: expected null or a non-empty list of module names")
        return errs


@dataclass
class AdaptersConfig(SharedLoRAConfig):
    name: str = "adapters"
    # O-LoRA's (and IncLoRA's) layers: the attention's query and value projections (lora.resolve_targets names
    # them per model: T5 q, v; Llama-like q_proj, v_proj; GPT-2 the fused c_attn, which adapts k too)
    target_modules: list[str] | None = field(default_factory=lambda: ["q", "v"])
    merge: bool = False  # evaluate the merged model (every adapter at once, no task identity)
    orthogonal_lambda: float = 0.0  # O-LoRA: weight of sum |A_old A_new^T| (0 = off)

    def errors(self, key: str) -> list[str]:
        errs = super().errors(key)
        check_positive(errs, f"{key}.orthogonal_lambda", self.orthogonal_lambda, allow_zero=True)
        return errs


def adapter_name(task: int) -> str:
    return f"task{task}"


class Adapters(Strategy):
    """Before task t: adapter ``task{t}`` is added (B = 0, so the model starts as the base) and is the only
    trainable tensor; the base and adapters 0..t-1 are frozen, so their weights stay bit-identical.

    Evaluation (``before_eval``) with task identity: task j is scored with adapter j alone, a task without an
    adapter yet with the base model alone. With ``merge``: every adapter so far is active at once, i.e. the
    merged model ``W + sum_t B_t A_t`` (computed unmerged, so the base weights are never rewritten), with no
    task identity; training then also runs with the old adapters active (frozen), as O-LoRA does.
    ``orthogonal_lambda`` adds ``lambda * sum_layers |A_old A_new^T|_1`` to the loss (O-LoRA, Wang et al. 2023).
    An evaluation switches adapters (``before_eval``); ``after_eval`` selects the training ones again.
    """

    name = "adapters"
    Config = AdaptersConfig
    supports = Supports(
        fsdp=Refused("orthogonal_lambda > 0: O-LoRA's penalty reads the adapters' A matrices outside the model's "
                     "forward, where FSDP holds them sharded and does not reduce their gradient; use distributed=ddp "
                     "or orthogonal_lambda=0", option="orthogonal_lambda", when=lambda cfg: cfg.orthogonal_lambda > 0),
        per_task_options=("orthogonal_lambda",),  # read by ``loss`` at every step
    )
    shared = False  # shared_lora: one adapter for the whole sequence

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.created = 0  # adapters added to the model so far (task order)
        self.base_parameters = 0
        self._pairs: list | None = None  # (old A stacked, new A) per layer, for the orthogonality loss
        self.costs: dict[str, Any] = {}  # accounting, updated after each task

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """Only the adapter trains; an adapter per task is kept (shared_lora: one)."""
        one = lora_size(size.model, self.cfg)
        kept = 1 if self.name == "shared_lora" else size.tasks
        return StateNeeds(sharded_bytes=kept * one * size.param_bytes, trainable=one)

    def names(self) -> list[str]:
        return ["shared"] if self.shared else [adapter_name(t) for t in range(self.created)]

    def training(self, task: int) -> list[str]:
        """Active adapters while training ``task``."""
        if self.shared:
            return ["shared"]
        return self.names() if self.cfg.merge else [adapter_name(task)]

    def _add(self, ctx: Context, task: int) -> None:
        if not self.base_parameters:
            self.base_parameters = sum(p.numel() for p in ctx.model.parameters())
        name = "shared" if self.shared else adapter_name(task)
        if not lora_parameters(ctx.model, name):  # else made before sharding (``before_shard``)
            if world().sharded:
                raise not_made_before_sharding(self.name)
            add_lora(ctx.model, name, self.cfg, seed=ctx.seed_for(INIT_SALT, task), device=ctx.device)
        self.created = task + 1

    def before_shard(self, ctx: Context) -> None:
        """FSDP: every task's adapter now, inactive (the base model's function), with the seed it would get at its
        task: the same adapters, sharded with the base (the FSDP/peft recipe: frozen base, trainable adapters)."""
        self.base_parameters = sum(p.numel() for p in ctx.model.parameters())
        for task in range(1 if self.shared else len(ctx.task_names)):
            name = "shared" if self.shared else adapter_name(task)
            add_lora(ctx.model, name, self.cfg, seed=ctx.seed_for(INIT_SALT, task), device=ctx.device)
        activate(ctx.model, [])

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        check_targets(ctx.model, self.cfg.target_modules)

    def before_task(self, ctx: Context) -> None:
        if not (self.shared and self.created):
            self._add(ctx, ctx.task_index)
        train_only(ctx.model, self.training(ctx.task_index)[-1])
        activate(ctx.model, self.training(ctx.task_index))
        self._pairs = None

    def after_eval(self, ctx: Context) -> None:
        if self.created:
            activate(ctx.model, self.training(min(ctx.task_index, self.created - 1)))

    def loss(
        self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor
    ) -> torch.Tensor:
        if self.shared or ctx.task_index == 0:
            return loss
        weight = self.option(ctx, "orthogonal_lambda")
        if weight == 0:
            return loss
        if self._pairs is None:
            old = [adapter_name(t) for t in range(ctx.task_index)]
            self._pairs = lora_a_pairs(ctx.model, old, adapter_name(ctx.task_index))
        with torch.autocast(ctx.device.type, enabled=False):
            overlap = subspace_overlap(self._pairs)
        ctx.log(lora_overlap=overlap.detach())
        return loss + weight * overlap

    def before_eval(self, ctx: Context, task_index: int) -> None:
        if self.shared or self.cfg.merge:
            activate(ctx.model, self.names())
        else:
            activate(ctx.model, [adapter_name(task_index)] if task_index < self.created else [])

    def on_resume(self, ctx: Context) -> None:
        """Re-create the adapters the checkpoint holds; the newest is the trainable one (its task may be
        unfinished; if it is finished, the next ``before_task`` freezes it)."""
        created, self.created = self.created, 0
        for task in range(min(created, 1) if self.shared else created):
            self._add(ctx, task)
        self.created = created
        if created:
            train_only(ctx.model, self.training(created - 1)[-1])
            activate(ctx.model, self.training(created - 1))

    def after_task(self, ctx: Context) -> None:
        per_adapter = [lora_parameters(ctx.model, n) for n in self.names()]
        self.costs = {"base_parameters_frozen": self.base_parameters, "adapters": len(per_adapter),
                      "trainable_parameters": count(per_adapter[-1]),
                      "extra_parameters": sum(count(a) for a in per_adapter),
                      "extra_bytes": tensor_bytes(p for a in per_adapter for _, p in a)}

    def accounting(self) -> dict[str, Any]:
        return dict(self.costs)

    def takeaway(self, ctx: Context) -> Takeaway:
        """The adapters ``before_eval`` makes active for each task (merge, shared_lora: all of them)."""
        every = self.shared or type(self).before_eval is not Adapters.before_eval or self.cfg.merge  # merge: no .merge
        return Takeaway(adapters={name: self.names() if every else [adapter_name(j)] if j < self.created else []
                                  for j, name in enumerate(ctx.task_names)})

    def state_dict(self) -> dict[str, Any]:
        return {"created": self.created, "base_parameters": self.base_parameters, "costs": dict(self.costs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.created, self.base_parameters = int(state["created"]), int(state["base_parameters"])
        self.costs = dict(state["costs"])


class SharedLoRA(Adapters):
    """One LoRA adapter over the frozen base, trained on every task in turn: the adapters baseline."""

    name = "shared_lora"
    Config = SharedLoRAConfig
    supports = Supports()  # no O-LoRA penalty: none of adapters' facts
    shared = True
