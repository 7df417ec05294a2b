"""Progressive networks for causal LMs: a frozen column per finished task, a new laterally linked one per task
(the column mathematics and the hooks that run them are in ``columns.py``). Progressive *Prompts* (a soft
prompt per task, concatenated) is another method: ``progressive_prompts`` in ``prompts.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_positive
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
from cl_runner.strategies.columns import ColumnHooks, adapted_layers, lora_column
from cl_runner.strategies.common import tensor_bytes
from cl_runner.strategies.seeding import seeded_rng
from cl_runner.strategies.support import Refused, Supports

INIT_SALT = 41  # seed offset of a new column's initialisation
ATTRIBUTE = "progressive_columns"  # the ModuleDict's name on the model (and in its state_dict)


@dataclass
class ProgressiveConfig(StrategyConfig):
    name: str = "progressive"
    rank: int = 8  # rank r of a column's update of each linear layer
    alpha: float = 16.0  # scaling of the updates: B A x * alpha / rank
    backbone_first_task: bool = False  # true: the LM itself is the first task's column (fine-tuned, then frozen)
    lateral: bool = True  # a new column gets gated input from the earlier columns' updates

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.rank", self.rank)
        check_positive(errs, f"{key}.alpha", self.alpha)
        return errs


class Progressive(Strategy):
    """By default the LM is a frozen backbone and every task trains a new column (rank-``rank`` updates of
    every linear layer of the blocks), with gated lateral input from the earlier columns when ``lateral``.
    With ``backbone_first_task`` the LM itself is column 0: fine-tuned on the first task (every parameter
    trains), then frozen under the later tasks' columns.

    Evaluation needs the task's identity: task j is scored with its own column active (or the bare backbone
    when j has none: the backbone's own task, or a task not trained yet). Parameters grow with every task:
    a column costs ``sum_m r (in_m + out_m)`` plus ``k sum_m out_m`` lateral gates for ``k`` earlier columns
    (``m`` over the adapted layers); ``accounting`` reports them per task, laterals separately.
    """

    name = "progressive"
    Config = ProgressiveConfig
    supports = Supports(encoder_decoder=Refused("its columns adapt one stack of transformer blocks (a decoder-only "
                                                "model's); an encoder-decoder has two"))

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.tasks: list[int] = []  # tasks that have a column, in order
        self.hooks: ColumnHooks | None = None
        self.trainable: dict[str, int] = {}  # task name -> parameters trained on it
        self.costs: dict[str, Any] = {}
        self._preparing = False  # in ``before_shard``: columns may be made though the run is sharded

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """Every task's column (built on the meta device, as ``_add`` builds it: no memory); only the newest, the
        largest, trains (``backbone_first_task``: the whole LM on the first task)."""
        layers, columns = adapted_layers(size.model), []
        with torch.device("meta"):
            for n in range(sum(self._has_column(t) for t in range(size.tasks))):
                column = lora_column(layers, self.cfg.rank, n if self.cfg.lateral else 0)
                columns.append(sum(p.numel() for p in column.parameters()))
        trainable = None if self.cfg.backbone_first_task else max(columns, default=0)
        return StateNeeds(sharded_bytes=sum(columns) * size.param_bytes, trainable=trainable)

    def _columns(self, model: torch.nn.Module) -> torch.nn.ModuleDict:
        if not hasattr(model, ATTRIBUTE):
            model.add_module(ATTRIBUTE, torch.nn.ModuleDict())
            self.hooks = ColumnHooks(model, getattr(model, ATTRIBUTE), self.cfg.alpha / self.cfg.rank)
        return getattr(model, ATTRIBUTE)

    def _add(self, ctx: Context, task: int) -> torch.nn.ModuleDict:
        model = getattr(ctx.model, "_orig_mod", ctx.model)  # under torch.compile: the model itself
        columns = self._columns(model)
        if str(task) not in columns:  # else made before sharding (``before_shard``)
            if world().sharded and not self._preparing:
                raise not_made_before_sharding(self.name)
            n_earlier = len(self.tasks) if self.cfg.lateral else 0
            dtype = model.get_output_embeddings().weight.dtype
            with seeded_rng(ctx.seed_for(INIT_SALT, task), ctx.device):
                column = lora_column(adapted_layers(model), self.cfg.rank, n_earlier)
            columns[str(task)] = column.to(ctx.device, dtype)
        self.tasks.append(task)
        return columns[str(task)]

    def before_shard(self, ctx: Context) -> None:
        """FSDP: every task's column now, as each task would make it (same shape, same seed), inactive until its
        task starts; FSDP shards them with the backbone."""
        self._preparing = True
        for task in range(len(ctx.task_names)):
            if self._has_column(task):
                self._add(ctx, task).requires_grad_(False)  # its task's ``before_task`` unfreezes it
        self.tasks, self._preparing = [], False

    def _has_column(self, task: int) -> bool:
        return task > 0 or not self.cfg.backbone_first_task

    def before_task(self, ctx: Context) -> None:
        if not self._has_column(ctx.task_index):
            return  # the backbone trains on the first task like naive fine-tuning
        ctx.model.requires_grad_(False)
        self._add(ctx, ctx.task_index).requires_grad_(True)
        self.before_eval(ctx, ctx.task_index)  # the new column is the active one

    def after_eval(self, ctx: Context) -> None:
        self.before_eval(ctx, ctx.task_index)  # back to the column being trained

    def before_eval(self, ctx: Context, task_index: int) -> None:
        if self.hooks is not None:
            self.hooks.active = task_index if task_index in self.tasks else None

    def after_task(self, ctx: Context) -> None:
        trained = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        self.trainable[ctx.task_name] = trained
        columns = getattr(getattr(ctx.model, "_orig_mod", ctx.model), ATTRIBUTE, torch.nn.ModuleDict())
        made = [columns[str(t)] for t in self.tasks]  # not the later tasks' columns made before sharding
        lateral = sum(p.numel() for c in made for p in c.gates.values())
        extra = sum(p.numel() for c in made for p in c.parameters())
        self.costs = {"trainable_parameters_per_task": dict(self.trainable), "trainable_parameters": trained,
                      "columns": len(made), "extra_parameters": extra, "lateral_parameters": lateral,
                      "extra_bytes": tensor_bytes(p for c in made for p in c.parameters()),
                      "backbone_parameters": sum(p.numel() for p in ctx.model.parameters())
                      - sum(p.numel() for p in columns.parameters())}

    def on_resume(self, ctx: Context) -> None:
        """Re-create the columns the checkpoint holds; only the newest trains (see ``Adapters.on_resume``)."""
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            ctx.model.requires_grad_(False)
            self._add(ctx, task).requires_grad_(True)
        if tasks:
            self.before_eval(ctx, tasks[-1])  # the newest column is the one a resumed task trains

    def takeaway(self, ctx: Context) -> Takeaway:
        return Takeaway(refused="its columns are cl-runner modules hooked on the backbone, "
                                "not a Hugging Face model or a peft "
                                "adapter; the run's checkpoints hold them")

    def accounting(self) -> dict[str, Any]:
        return dict(self.costs)

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "trainable": dict(self.trainable), "costs": dict(self.costs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = [int(t) for t in state["tasks"]]
        self.trainable, self.costs = dict(state["trainable"]), dict(state["costs"])
