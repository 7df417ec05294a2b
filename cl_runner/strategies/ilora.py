"""I-LoRA (Ren et al. 2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning"; the
reference code is ``method/ILORA.py`` of github.com/which47/LLMCL): a fast and a slow LoRA adapter over the frozen
base, with experience replay.

- The *fast* adapter is the only trainable tensor, trained on every task in turn on batches that replay mixes
  buffer examples into (``replay.py``: the buffer holds finished tasks' examples).
- After every optimizer step the *slow* adapter moves towards the fast one: ``slow <- a * slow + (1 - a) * fast``
  on each LoRA matrix (A and B separately), ``a = min(1 - 1/(step + 1), ema_lambda)`` with ``step`` the task's
  optimizer steps so far (``update_ema_weights``; with ``ema_lambda <= 0.5`` this is ``ema_lambda`` at every step).
- On the replayed examples of a batch the hidden states of the fast model ``h_f`` are pulled towards those of the
  slow one ``h_s`` (no gradient through the slow one): ``(h_s - h_f)^2`` (``consistency: mse``, the default) or
  the reference's one-sided ``relu(h_s - h_f)^2`` = ``MSE(h_f, where(h_f > h_s, h_f, h_s))`` (``max``; a
  ratchet that ran away on the tiny default sequence), averaged over every hidden unit of every hidden state the
  model returns (the embedding output and each layer's) at every real token of the step's replayed examples, and
  added with weight ``consistency_weight``. An encoder-decoder has two stacks (``ModelKind.hidden_states``): each
  position is averaged over its own stack's states, and the positions of both (the encoder's prompt + EOS, the
  decoder's start + target) are the tokens averaged over.
- Evaluation uses the slow adapter (``eval_adapter``).
Differences from the reference, all documented in conf/strategy/ilora.yaml: the consistency loss (above); the
language-model loss is the loop's mean over the target tokens of the whole mixed batch (the reference averages
the new and the replayed batch's means); padding is left out of the consistency mean; the buffer holds finished
tasks' examples only (the reference's reservoir also takes in the current task's, but replays only from the second
task on). The slow adapter starts as a copy of the fast one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_choice, check_fraction, check_positive
from cl_runner.core.dist import world
from cl_runner.core.errors import ConfigError
from cl_runner.core.lazy import no_grad
from cl_runner.strategies.adapters import SharedLoRAConfig
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Takeaway, not_made_before_sharding
from cl_runner.strategies.common import local, tensor_bytes
from cl_runner.strategies.lora import activate, add_lora, check_targets, count, lora_parameters, lora_size, train_only
from cl_runner.strategies.replay import Replay, ReplayConfig
from cl_runner.strategies.support import Refused, Supports

INIT_SALT = 51  # ctx.seed_for salt of the adapters' initialisation
ADAPTERS = ("slow", "fast")  # eval_adapter choices
CONSISTENCY = ("max", "mse")  # consistency choices


@dataclass
class ILoRAConfig(SharedLoRAConfig, ReplayConfig):
    name: str = "ilora"
    buffer_size: int = 500  # the reference's buffer
    replay_ratio: float = 0.5  # the reference replays as many examples as the batch has
    ema_lambda: float = 0.25  # slow <- a*slow + (1-a)*fast, a = min(1 - 1/(step+1), ema_lambda)
    consistency_weight: float = 1.0  # weight of the hidden-state consistency loss on replayed examples
    consistency: str = "mse"  # mse: (h_s - h_f)^2 | max: relu(h_s - h_f)^2 (the reference code's; can run away)
    eval_adapter: str = "slow"  # the adapter evaluation uses: slow | fast

    def errors(self, key: str) -> list[str]:
        errs = SharedLoRAConfig.errors(self, key) + ReplayConfig.errors(self, key)
        check_fraction(errs, f"{key}.ema_lambda", self.ema_lambda)
        check_positive(errs, f"{key}.consistency_weight", self.consistency_weight, allow_zero=True)
        check_choice(errs, f"{key}.eval_adapter", self.eval_adapter, ADAPTERS)
        check_choice(errs, f"{key}.consistency", self.consistency, CONSISTENCY)
        return errs


def ema_(slow: list[torch.Tensor], fast: list[torch.Tensor], a: float) -> None:
    """``slow <- a * slow + (1 - a) * fast`` in place."""
    torch._foreach_mul_(slow, a)
    torch._foreach_add_(slow, fast, alpha=1.0 - a)


def consistency_sum(fast: tuple[torch.Tensor, ...], slow: tuple[torch.Tensor, ...], mask: torch.Tensor,
                    one_sided: bool = True) -> torch.Tensor:
    """``sum relu(h_s - h_f)^2`` (``(h_s - h_f)^2`` unless ``one_sided``) over every hidden state, unit and position
    where ``mask`` (rows, length) is set, divided by the units per position (hidden states x width): summed over
    positions, averaged over units (fp32)."""
    gaps = ((s.float() - f.float()) for f, s in zip(fast, slow, strict=True))
    total = sum(((g.clamp_min(0) if one_sided else g).square().sum(-1) * mask).sum() for g in gaps)
    return total / (len(fast) * fast[0].size(-1))


class ILoRA(Replay):
    """Replay (buffer, mixing, state) plus the two adapters, the EMA and the consistency loss."""

    name = "ilora"
    Config = ILoRAConfig
    supports = Supports(
        pack=Refused("its consistency loss reads the replayed examples' rows"),
    ) | Replay.supports

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.base_parameters = 0
        self.costs: dict[str, Any] = {}  # the adapters' accounting, updated after each task
        self._made = False  # both adapters are in the model
        self._hook: Any = None  # the forward pre-hook asking for hidden states (training with a buffer only)
        self._replayed: set[int] = set()  # ids of the buffer's examples: which rows of a micro-batch are replayed

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """The buffer and the fast and slow adapters; only the fast one trains."""
        one = lora_size(size.model, self.cfg)
        return super().memory_needs(size) + StateNeeds(sharded_bytes=2 * one * size.param_bytes, trainable=one)

    def _add(self, ctx: Context, sharding: bool = False) -> None:
        """Both adapters (once), the slow one a copy of the fast one; under FSDP only before sharding."""
        self._made = self._made or bool(lora_parameters(ctx.model, "fast"))
        if self._made:
            return
        if world().sharded and not sharding:
            raise not_made_before_sharding(self.name)
        self.base_parameters = sum(p.numel() for p in ctx.model.parameters())
        for name in ("fast", "slow"):
            add_lora(ctx.model, name, self.cfg, seed=ctx.seed_for(INIT_SALT, 0), device=ctx.device)
        slow, fast = self._pairs(ctx.model)
        with torch.no_grad():
            torch._foreach_copy_(slow, fast)
        self._made = True

    def _pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The slow adapter's LoRA matrices and the fast one's, matched, as local shards."""
        fast = dict(lora_parameters(model, "fast"))
        slow = lora_parameters(model, "slow")
        return ([local(p.detach()) for _, p in slow],
                [local(fast[n.replace(".slow.", ".fast.")].detach()) for n, _ in slow])

    def _train_fast(self, ctx: Context) -> None:
        train_only(ctx.model, "fast")
        activate(ctx.model, ["fast"])

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        check_targets(ctx.model, self.cfg.target_modules)

    def before_shard(self, ctx: Context) -> None:
        """FSDP: both adapters now (B = 0: the base model's function), sharded with the base."""
        self._add(ctx, sharding=True)

    def before_task(self, ctx: Context) -> None:
        self._add(ctx)
        self._train_fast(ctx)

    def on_resume(self, ctx: Context) -> None:
        self._add(ctx)
        self._train_fast(ctx)

    def before_epoch(self, ctx: Context) -> None:
        if len(self.buffer) and self._hook is None:
            self._replayed = {id(e) for e in self.buffer.examples}
            self._hook = ctx.model.register_forward_pre_hook(_with_hidden_states, with_kwargs=True)

    def after_epoch(self, ctx: Context) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def loss(self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        if self._hook is None or self.cfg.consistency_weight == 0:
            return loss
        if "position_ids" in batch:
            raise ConfigError("train.pack: not supported with strategy.name=ilora (set train.pack=false)")
        micro, kind = ctx.micro, ctx.kind
        rows = [i for i, e in enumerate(micro.examples) if id(e) in self._replayed]
        picked = rows or [0]  # every rank runs the slow model on every micro-batch: FSDP gathers in step
        inputs = {k: v[picked] for k, v in kind.model_inputs(batch).items()}
        activate(ctx.model, ["slow"])
        with torch.no_grad(), ctx.autocast():
            slow = kind.hidden_states(ctx.model(**inputs), inputs)  # per stack: an encoder-decoder has two
        activate(ctx.model, ["fast"])
        one_sided = self.cfg.consistency == "max"
        total = sum(consistency_sum(tuple(h[picked] for h in fast), states, mask.to(fast[0].dtype), one_sided)
                    for (fast, _), (states, mask) in zip(kind.hidden_states(outputs, batch), slow, strict=True))
        step_tokens = sum(kind.model_tokens(e) for e in micro.step if id(e) in self._replayed)
        share = 1.0 / (step_tokens * micro.weight) if rows and micro.weight else 0.0
        tokens = sum(kind.model_tokens(micro.examples[i]) for i in rows)  # counted on the host: no sync
        ctx.log(ilora_consistency=total.detach() / tokens if rows else 0.0)
        return loss + self.cfg.consistency_weight * share * total

    @no_grad
    def after_step(self, ctx: Context) -> None:
        ema_(*self._pairs(ctx.model), min(1.0 - 1.0 / (ctx.step + 1), self.cfg.ema_lambda))

    def before_eval(self, ctx: Context, task_index: int) -> None:
        if self._made:
            activate(ctx.model, [self.cfg.eval_adapter])

    def after_eval(self, ctx: Context) -> None:
        if self._made:
            activate(ctx.model, ["fast"])

    def after_task(self, ctx: Context) -> None:
        super().after_task(ctx)
        both = lora_parameters(ctx.model, "fast") + lora_parameters(ctx.model, "slow")
        self.costs = {"base_parameters_frozen": self.base_parameters, "trainable_parameters": count(both) // 2,
                      "extra_parameters": count(both), "extra_bytes": tensor_bytes(p for _, p in both)}

    def accounting(self) -> dict[str, Any]:
        return {**super().accounting(), **self.costs}

    def takeaway(self, ctx: Context) -> Takeaway:
        """Every task is scored with ``eval_adapter`` (the slow, EMA one by default): that adapter is saved."""
        return Takeaway(adapters={name: [self.cfg.eval_adapter] if self._made else [] for name in ctx.task_names})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base_parameters": self.base_parameters, "costs": dict(self.costs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base_parameters, self.costs = int(state["base_parameters"]), dict(state["costs"])


def _with_hidden_states(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "output_hidden_states": True}
