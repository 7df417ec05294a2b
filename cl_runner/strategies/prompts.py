"""Soft prompts over a frozen LM: prompt tuning (Lester et al. 2021) and Progressive Prompts (Razdaibiedina et
al., ICLR 2023). Not to be confused with ``progressive`` (progressive *networks*, ``progressive.py``), which adds
a column of weights per task: here a task adds ``length`` trained virtual tokens in front of the input.

How the prompt reaches the model. peft's ``PeftModel`` prompt tuning does not fit cl-runner's evaluation: it
prepends the prompt on *every* forward, also on the cached continuation calls of ``evaluate.cached_forward``
(label scoring, greedy generation), where the prompt is already in the KV cache; it drops ``position_ids``
(left-padded batches then get wrong positions); it wraps the model in a new object, which the scorer, the
checkpoints and FSDP would have to learn about; and it has no concatenation of several tasks' prompts. So each
prompt is a peft ``PromptEmbedding`` (peft's own module, initialised here: see ``new_prompt``) kept in a
``ModuleDict`` on the model (checkpoints, ``keep_best`` and FSDP see it as model weights), and ``PromptHooks``
prepends the active prompts with three hooks on the same model object:

- a forward pre-hook on the model: on a call without a (non-empty) KV cache, ``n`` placeholder ids are put in
  front of ``input_ids``, ``n`` ones in front of ``attention_mask`` and, when ``position_ids`` are given, the
  prompt gets positions ``0..n-1`` and the input its own positions + ``n``; on a cached call (the prompt is in
  the cache) only ``attention_mask`` is extended and ``position_ids`` shifted by ``n``. A left-padded row
  ``[prompt, pad, pad, x]`` thus computes exactly what ``[prompt, x]`` alone does;
- a forward hook on the input embeddings: the placeholders' embeddings are replaced by the prompt;
- a forward hook on the model: the ``n`` prompt positions are cut from ``logits``, so the logits align with the
  caller's ``input_ids`` and labels (the loss, label scores and generation need no change).

Packed rows (``train.pack``) hold several examples per row, each of which would need its own prompt: refused at
config time, and so are encoder-decoder models (``PromptTuning.supports``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_choice, check_positive
from cl_runner.core.dist import world
from cl_runner.core.errors import ConfigError
from cl_runner.models.lm import IGNORE_INDEX
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
from cl_runner.strategies.support import Refused, Supports

INITS = ("random", "vocab", "text")
INIT_SALT = 53  # ctx.seed_for salt of a new prompt's initialisation
ATTRIBUTE = "soft_prompts"  # the ModuleDict's name on the model (and in its state_dict)


@dataclass
class PromptTuningConfig(StrategyConfig):
    name: str = "prompt_tuning"
    length: int = 10  # virtual tokens per prompt (Progressive Prompts: prefix_len 10)
    init: str = "vocab"  # random | vocab | text (see new_prompt)
    shared: bool = False  # one prompt trained through every task instead of one per task
    task_identity: bool = True  # score task j with its own prompt; false: with the newest prompt

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.length", self.length)
        check_choice(errs, f"{key}.init", self.init, INITS)
        return errs


@dataclass
class ProgressivePromptsConfig(StrategyConfig):
    name: str = "progressive_prompts"
    length: int = 10  # virtual tokens added per task
    init: str = "vocab"  # random | vocab | text
    task_identity: bool = False  # score task j with [P_j; ...; P_1]; false: with every prompt so far

    errors = PromptTuningConfig.errors


def init_ids(ctx: Context, task: int, length: int, init: str) -> list[int] | None:
    """The token ids whose embeddings start a prompt: ``vocab``: drawn uniformly from the vocabulary (seeded);
    ``text``: the prompt tokens (the labelled-out part) of the task's first training example, trimmed or
    repeated to ``length`` (peft's TEXT rule, with the task's own instruction as the text); ``random``: None."""
    if init == "vocab":
        vocab = ctx.model.get_input_embeddings().num_embeddings
        return torch.randint(vocab, (length,), generator=ctx.generator(INIT_SALT + 1, task)).tolist()
    if init == "text":
        text = instruction(ctx, task)
        return (text * -(-length // len(text)))[:length]
    return None


def instruction(ctx: Context, task: int) -> list[int]:
    """The prompt tokens (those without a label) of task ``task``'s first training example."""
    first = ctx.train_sets[task][0] if ctx.train_sets[task] else {"input_ids": [], "labels": []}
    return [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label == IGNORE_INDEX]


def new_prompt(ctx: Context, task: int, length: int, init: str) -> torch.nn.Module:
    """peft's ``PromptEmbedding`` of ``length`` tokens, in the model's dtype, on ``ctx.device``. peft's RANDOM
    init (``nn.Embedding``'s N(0, 1)) is drawn on the CPU under the task's seed; ``vocab``/``text`` then copy the
    embeddings of ``init_ids`` (Progressive Prompts' ``init_new_prompt`` samples vocabulary tokens), drawn on the
    CPU too, so the prompt is the same on any device and process count."""
    from peft import PromptEmbedding, PromptTuningInit
    from peft import PromptTuningConfig as PeftConfig

    from cl_runner.strategies.seeding import seeded_rng

    embeddings = ctx.model.get_input_embeddings()
    config = PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=length, token_dim=embeddings.embedding_dim,
                        num_transformer_submodules=1, prompt_tuning_init=PromptTuningInit.RANDOM)
    with seeded_rng(ctx.seed_for(INIT_SALT, task), torch.device("cpu")):
        prompt = PromptEmbedding(config, embeddings)
    ids = init_ids(ctx, task, length, init)
    if ids is not None:
        rows = torch.tensor(ids, device=embeddings.weight.device)
        with torch.no_grad():
            prompt.embedding.weight.copy_(embeddings.weight.detach()[rows])
    return prompt.to(ctx.device, embeddings.weight.dtype)


class PromptHooks:
    """Prepends the prompts of ``active`` (task keys, leftmost first) to every forward of ``model`` (see the
    module docstring); nothing is prepended while ``active`` is empty."""

    def __init__(self, model: torch.nn.Module, prompts: torch.nn.ModuleDict, length: int) -> None:
        self.prompts, self.length, self.active = prompts, length, []
        self._embed_pending = self._strip = 0  # prompt tokens the running forward still has to insert / cut
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.get_input_embeddings().register_forward_hook(self._embed)
        model.register_forward_hook(self._after)

    def prompt(self) -> torch.Tensor:
        """(n, dim): the active prompts concatenated in order."""
        return torch.cat([self.prompts[key].embedding.weight for key in self.active])

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        n, self._embed_pending, self._strip = self.length * len(self.active), 0, 0
        if not n:
            return None
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        first = cache is None or cache.get_seq_length() == 0
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if (args or kwargs.get("input_ids") is None or kwargs.get("labels") is not None
                or (first and positions is not None and mask is None)):
            raise RuntimeError("soft prompts: expected input_ids as a keyword, no labels (the caller computes the "
                               "loss on the returned logits) and no packed rows (train.pack)")
        ids = kwargs["input_ids"]
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.size(0), n), mask], dim=1)
        if positions is not None:
            shifted = positions + n
            if first:
                shifted = torch.cat([torch.arange(n, device=ids.device).expand(ids.size(0), n), shifted], dim=1)
            kwargs["position_ids"] = shifted
        if first:
            kwargs["input_ids"] = torch.cat([ids[:, :1].expand(-1, n), ids], dim=1)  # placeholders (_embed)
            self._embed_pending = self._strip = n
        return args, kwargs

    def _embed(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        n, self._embed_pending = self._embed_pending, 0
        if not n:
            return None
        prompt = self.prompt().to(output.dtype)
        return torch.cat([prompt.expand(output.size(0), -1, -1), output[:, n:]], dim=1)

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        n, self._strip = self._strip, 0
        if n:
            output.logits = output.logits[:, n:]
        return output


class PromptTuning(Strategy):
    """The LM is frozen; before task t a new soft prompt P_t (``length`` tokens) is made and is the only
    trainable tensor; the earlier prompts stay bit-identical. Evaluation with ``task_identity`` scores task j
    with P_j (a task not trained yet with the bare LM); without, every task with the newest prompt (so the
    matrix shows how much a prompt for task t still serves the earlier tasks). With ``shared`` one prompt is
    trained through the whole sequence (the prompt-tuning counterpart of naive fine-tuning; no identity).
    Cost per task: ``length x hidden`` parameters, and ``length`` more tokens in every forward."""

    name = "prompt_tuning"
    Config = PromptTuningConfig
    supports = Supports(  # progressive_prompts (a subclass) shares them
        pack=Refused("a soft prompt goes in front of each example, and a packed row holds several"),
        encoder_decoder=Refused("its soft prompts hook the input embeddings, which T5's encoder and decoder share"),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.tasks: list[int] = []  # tasks whose prompt has been made, in order
        self.hooks: PromptHooks | None = None
        self.costs: dict[str, Any] = {}
        self._preparing = False  # in ``before_shard``: prompts may be made though the run is sharded

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """Only the new prompt trains (``length`` x the embedding width); one kept per task; the most prompts in
        front of an example at once lengthen it."""
        one = self.cfg.length * size.model.get_input_embeddings().embedding_dim
        front = len(self.training_prompts(size.tasks - 1)) * self.cfg.length
        return StateNeeds(sharded_bytes=size.tasks * one * 4, trainable=one, extra_tokens=front)

    def key(self, task: int) -> str:
        return "0" if getattr(self.cfg, "shared", False) else str(task)

    def training_prompts(self, task: int) -> list[str]:
        """The prompts in front of the input while ``task`` trains (leftmost first)."""
        return [self.key(task)]

    def eval_prompts(self, task: int) -> list[str]:
        """The prompts in front of the input while ``task`` is scored."""
        if not self.tasks:
            return []
        if self.cfg.shared or not self.cfg.task_identity:
            return self.training_prompts(self.tasks[-1])
        return [self.key(task)] if task in self.tasks else []

    def _bare(self, ctx: Context) -> torch.nn.Module:
        return getattr(ctx.model, "_orig_mod", ctx.model)  # under torch.compile: the model itself

    def _store(self, ctx: Context) -> torch.nn.ModuleDict:
        """The model's prompts; the first call adds them and the hooks (kept with them: one set per model)."""
        model = self._bare(ctx)
        if not hasattr(model, ATTRIBUTE):
            model.add_module(ATTRIBUTE, torch.nn.ModuleDict())
            getattr(model, ATTRIBUTE).hooks = PromptHooks(model, getattr(model, ATTRIBUTE), self.cfg.length)
        store = getattr(model, ATTRIBUTE)
        self.hooks = store.hooks
        return store

    def _add(self, ctx: Context, task: int) -> torch.nn.Module:
        store, key = self._store(ctx), self.key(task)
        if key not in store:  # else made before sharding (``before_shard``) or shared and made already
            if world().sharded and not self._preparing:
                raise not_made_before_sharding(self.name)
            store[key] = new_prompt(ctx, int(key), self.cfg.length, self.cfg.init)
        if task not in self.tasks:
            self.tasks.append(task)
        return store[key]

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        model = self._bare(ctx)
        prompts = len(self.training_prompts(len(ctx.task_names) - 1))  # the most prompts in front at once
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
        longest = max((len(e["input_ids"]) for s in ctx.train_sets for e in s), default=0)
        if context and longest + prompts * self.cfg.length > context:
            raise ConfigError(f"strategy.length: {prompts} x {self.cfg.length} prompt tokens + the longest training "
                              f"example ({longest} tokens) exceed the model's context of {context} tokens; lower "
                              "strategy.length or train.max_length")
        if self.cfg.init == "text" and not all(instruction(ctx, t) for t in range(len(ctx.task_names))):
            raise ConfigError("strategy.init: text starts each prompt from its task's instruction (the prompt tokens "
                              "of its first training example); a task has none: use vocab or random")

    def before_shard(self, ctx: Context) -> None:
        """FSDP: every task's prompt now, as its task would make it (same seed), frozen and inactive until then."""
        self._preparing = True
        for task in range(len(ctx.task_names)):
            self._add(ctx, task).requires_grad_(False)
        self.tasks, self._preparing = [], False

    def _train(self, ctx: Context, task: int) -> None:
        """Only ``task``'s prompt trains; the training prompts are the active ones."""
        self._bare(ctx).requires_grad_(False)
        self._add(ctx, task).requires_grad_(True)
        self.hooks.active = self.training_prompts(task)

    def before_task(self, ctx: Context) -> None:
        self._train(ctx, ctx.task_index)

    def before_eval(self, ctx: Context, task_index: int) -> None:
        if self.hooks is not None:
            self.hooks.active = self.eval_prompts(task_index)

    def after_eval(self, ctx: Context) -> None:
        if self.hooks is not None:
            self.hooks.active = self.training_prompts(self.tasks[-1]) if self.tasks else []

    def on_resume(self, ctx: Context) -> None:
        """Re-create the prompts the checkpoint holds (their weights are loaded next); the newest one trains."""
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            self._train(ctx, task)

    def after_task(self, ctx: Context) -> None:
        store = getattr(self._bare(ctx), ATTRIBUTE)
        made = [store[k] for k in dict.fromkeys(self.key(t) for t in self.tasks)]  # not those made for FSDP
        per_prompt = sum(p.numel() for p in made[-1].parameters())
        self.costs = {"prompts": len(made), "prompt_tokens_per_task": self.cfg.length,
                      "trainable_parameters_per_task": {ctx.task_names[t]: per_prompt for t in self.tasks},
                      "trainable_parameters": per_prompt, "extra_parameters": per_prompt * len(made),
                      "extra_bytes": tensor_bytes(p for m in made for p in m.parameters()),
                      "prompt_tokens_at_eval": self.cfg.length * len(self.eval_prompts(self.tasks[-1])),
                      "base_parameters_frozen": sum(p.numel() for p in ctx.model.parameters())
                      - sum(p.numel() for p in store.parameters())}

    def takeaway(self, ctx: Context) -> Takeaway:
        return Takeaway(refused="its soft prompts are cl-runner modules put before each input, "
                                "not a Hugging Face model or a peft "
                                "adapter; the run's checkpoints hold them")

    def accounting(self) -> dict[str, Any]:
        return dict(self.costs)

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "costs": dict(self.costs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks, self.costs = [int(t) for t in state["tasks"]], dict(state["costs"])


class ProgressivePrompts(PromptTuning):
    """Progressive Prompts: before task t a new prompt P_t is made; the input is ``[P_t; P_{t-1}; ...; P_1; x]``
    (the newest prompt leftmost, as ``progress_previous_prompts`` concatenates in the authors' code), with
    P_1..P_{t-1} frozen, so the earlier prompts stay bit-identical. Evaluation scores every task with every
    prompt so far (the model after task t, which needs no task identity: the authors' evaluation); with
    ``task_identity`` task j is scored with ``[P_j; ...; P_1]`` (a task not trained yet with all prompts so far).
    Cost: ``length x hidden`` parameters per task, and ``length`` more tokens per forward with every task."""

    name = "progressive_prompts"
    Config = ProgressivePromptsConfig

    def training_prompts(self, task: int) -> list[str]:
        return [str(t) for t in range(task, -1, -1)]

    def eval_prompts(self, task: int) -> list[str]:
        if not self.tasks:
            return []
        newest = self.tasks[-1]
        return self.training_prompts(min(task, newest) if self.cfg.task_identity else newest)
