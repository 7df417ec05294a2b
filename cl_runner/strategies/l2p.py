"""Learning to Prompt (L2P; Wang et al., CVPR 2022) over a frozen causal LM, as TRACE runs it
(``model/Dynamic_network/L2P.py``): one pool of ``pool_size`` soft prompts of ``length`` tokens, each with a
learnable key. For every input a query is computed from the frozen model; the ``top_k`` prompts whose keys are
most cosine-similar to it are put in front of the input (the most similar first), and the surrogate term
``- pull_constraint_coeff * sum_chosen cos(query, key)`` (summed over the chosen keys, averaged over the step's
examples) pulls the chosen keys toward their queries. Only the pool and its keys train, through every task; scoring
needs no task identity (each input picks its own prompts).

The query (``query``): ``hidden``, the mean of the frozen model's last hidden states over the input's prompt tokens
(the LM counterpart of the paper's frozen ViT feature; one extra forward of the model's body, without prompts), or
``embeddings``, the mean of its input token embeddings (TRACE's ``embedding_key='mean'``, no extra forward). At
training only the prompt tokens count (the loop's micro-batch says where its targets start), so an example picks the
same prompts when trained and when scored; perplexity scoring feeds prompt and target together, whose query then
averages over both.

The prompts are put in front by ``prompts.PromptHooks`` (see ``prompts.py``: prompt positions, left padding, KV-cache
continuations), here with a different prompt per row. Packed rows are refused (``schema.PACK_REFUSED``), as are
encoder-decoder models and FSDP (the pool is made after sharding, and the query runs the body inside the model's
forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_choice, check_positive
from cl_runner.core.errors import ConfigError
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import target_count
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Strategy, StrategyConfig, Takeaway
from cl_runner.strategies.common import evaluating, tensor_bytes
from cl_runner.strategies.prompts import PromptHooks, init_ids
from cl_runner.strategies.support import Refused, Supports

QUERIES = ("hidden", "embeddings")
KEY_SALT = 81  # ctx.generator salt of the keys' initialisation (the prompts use prompts.init_ids' own salt)
ATTRIBUTE = "l2p_pool"  # the pool's name on the model (and in its state_dict)


@dataclass
class L2PConfig(StrategyConfig):
    name: str = "l2p"
    pool_size: int = 10  # prompts in the pool (TRACE training/main.py:429; the paper's M = 10)
    length: int = 5  # tokens per prompt (TRACE training/main.py:430; the paper's L_p = 5)
    top_k: int = 3  # prompts chosen per input (TRACE L2P.py:52; the paper's N = 5)
    pull_constraint_coeff: float = 0.5  # weight of the key-query term (TRACE L2P.py:54; l2p-pytorch: 0.1)
    query: str = "hidden"  # hidden: frozen model's last hidden states | embeddings: input embeddings (TRACE)

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.pool_size", self.pool_size)
        check_positive(errs, f"{key}.length", self.length)
        check_positive(errs, f"{key}.top_k", self.top_k)
        check_positive(errs, f"{key}.pull_constraint_coeff", self.pull_constraint_coeff, allow_zero=True)
        check_choice(errs, f"{key}.query", self.query, QUERIES)
        if not errs and self.top_k > self.pool_size:
            errs.append(f"{key}.top_k: expected at most pool_size ({self.pool_size}), got {self.top_k}")
        return errs


def prompt_pool(prompts: torch.Tensor, keys: torch.Tensor) -> torch.nn.Module:
    """The prompts (pool_size, length, hidden) and their keys (pool_size, hidden), held by the model: a plain
    Module with the two parameters (no Module subclass at import: it would import torch, which ``cl-run --help``
    and bad inputs never do, docs/development.md)."""
    pool = torch.nn.Module()
    pool.prompts, pool.keys = torch.nn.Parameter(prompts), torch.nn.Parameter(keys)
    return pool


def select(keys: torch.Tensor, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, top_k) indices of the keys most cosine-similar to each query (most similar first) and (B, top_k) their
    similarities, differentiable w.r.t. ``keys`` (fp32)."""
    similarity = torch.nn.functional.normalize(queries.float(), dim=-1) @ torch.nn.functional.normalize(
        keys.float(), dim=-1).T
    chosen = similarity.detach().topk(top_k, dim=1).indices
    return chosen, similarity.gather(1, chosen)


@no_grad
def input_query(model: torch.nn.Module, kwargs: dict[str, Any], prompt_lengths: list[int] | None,
                kind: str) -> torch.Tensor:
    """(B, hidden) query of each row of a forward's inputs: the mean, over its real tokens (only the first
    ``prompt_lengths[b]`` with those given), of the body's last hidden states or of the input embeddings."""
    ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if prompt_lengths is not None:  # training rows, right-padded: the prompt, not the target
        mask = mask * (torch.arange(ids.size(1), device=ids.device) < torch.tensor(prompt_lengths, device=ids.device)
                       .unsqueeze(1))
    if kind == "embeddings":
        states = model.get_input_embeddings()(ids)
    else:
        with evaluating(model.base_model):  # the frozen model's feature: no dropout, also in a training forward
            states = model.base_model(input_ids=ids, attention_mask=kwargs.get("attention_mask"),
                                      position_ids=kwargs.get("position_ids"), use_cache=False).last_hidden_state
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1).float() / weights.sum(1).float().clamp_min(1)


class PoolHooks(PromptHooks):
    """``PromptHooks`` with a prompt per row: on a forward without KV cache, each row's query picks ``top_k``
    prompts of the pool; the similarities of the chosen keys wait in ``similarity`` for the ``loss`` hook."""

    def __init__(self, model: torch.nn.Module, pool: torch.nn.Module, strategy: L2P) -> None:
        super().__init__(model, torch.nn.ModuleDict(), pool.prompts.shape[1])
        self.pool, self.strategy = pool, strategy
        self.rows: torch.Tensor | None = None  # (B, top_k * length, hidden): the running forward's prompts
        self.similarity: torch.Tensor | None = None  # (B, top_k) of the last training forward
        self.chosen: torch.Tensor | None = None  # (B, top_k) prompt indices of the last forward
        # how often each prompt was chosen by the current task's training forwards
        self.counts = torch.zeros(pool.prompts.shape[0], dtype=torch.long, device=pool.prompts.device)

    def prompt(self) -> torch.Tensor:
        return self.rows

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if self.active and not args and kwargs.get("input_ids") is not None and (
                cache is None or cache.get_seq_length() == 0):
            self._embed_pending = 0  # the query's own forward must not get prompts
            cfg, lengths = self.strategy.cfg, self.strategy.prompt_lengths(module)
            if lengths is not None and len(lengths) != kwargs["input_ids"].size(0):
                lengths = None
            query = input_query(module, kwargs, lengths, cfg.query)
            self.chosen, similarity = select(self.pool.keys, query, cfg.top_k)
            prompts = self.pool.prompts[self.chosen]  # (B, top_k, length, hidden)
            self.rows = prompts.reshape(prompts.size(0), -1, prompts.size(-1))
            if module.training and torch.is_grad_enabled():
                self.similarity = similarity
                chosen = self.chosen.flatten()  # counted on the device: no host sync per step
                self.counts.index_add_(0, chosen, torch.ones_like(chosen))
        return super()._before(module, args, kwargs)


class L2P(Strategy):
    """L2P: a frozen LM, a pool of prompts with keys, the best-matching prompts of each input put in front of it."""

    name = "l2p"
    Config = L2PConfig
    supports = Supports(
        pack=Refused("a query and prompts per example, not per packed row"),
        encoder_decoder=Refused("its soft prompts hook the input embeddings, which T5's encoder and decoder share"),
        fsdp=Refused("its prompt pool is added after the model is sharded, and its query runs the model's body "
                     "inside the model's forward; use distributed=ddp"),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.hooks: PoolHooks | None = None
        self.ctx: Context | None = None  # the training context (its ``micro`` marks training forwards)
        self.made = False  # whether the pool exists (from the first task on)
        self.counts: dict[str, list[int]] = {}  # task -> how often each prompt was chosen while it trained
        self.resumed_counts: list[int] = []  # the current task's choices so far, from a checkpoint

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """The pool (``pool_size`` prompts of ``length`` tokens and their keys) is all that trains; ``top_k``
        prompts go in front of each example."""
        pool = self.cfg.pool_size * (self.cfg.length + 1) * size.model.get_input_embeddings().embedding_dim
        return StateNeeds(local_bytes=pool * size.param_bytes, trainable=pool,
                          extra_tokens=self.cfg.top_k * self.cfg.length)

    def prompt_lengths(self, model: torch.nn.Module) -> list[int] | None:
        """Prompt tokens of each row of the running training forward (None outside one: scoring)."""
        micro = self.ctx.micro if self.ctx is not None and model.training else None
        return None if micro is None else [len(e["input_ids"]) - target_count(e) for e in micro.examples]

    def _bare(self, ctx: Context) -> torch.nn.Module:
        return getattr(ctx.model, "_orig_mod", ctx.model)  # under torch.compile: the model itself

    def check(self, ctx: Context) -> None:
        super().check(ctx)  # what its class refuses (an encoder-decoder model: strategies/support.py)
        model = self._bare(ctx)
        if self.cfg.query == "hidden" and getattr(model, "base_model", model) is model:
            raise ConfigError(f"strategy.query: hidden reads the last hidden states of the model's body, and "
                              f"{type(model).__name__} has none apart from its head; use query=embeddings")
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
        longest = max((len(e["input_ids"]) for s in ctx.train_sets for e in s), default=0)
        prompt = self.cfg.top_k * self.cfg.length
        if context and longest + prompt > context:
            raise ConfigError(f"strategy.length: {self.cfg.top_k} x {self.cfg.length} prompt tokens + the longest "
                              f"training example ({longest} tokens) exceed the model's context of {context} tokens; "
                              "lower strategy.top_k, strategy.length or train.max_length")

    def _pool(self, ctx: Context) -> torch.nn.Module:
        """The model's pool; the first call makes it (seeded) and its hooks. Prompts start as embeddings of random
        vocabulary tokens (TRACE's ``init_new_prompt``), keys uniform in [0, 1) (l2p-pytorch's ``uniform``)."""
        model = self._bare(ctx)
        if not hasattr(model, ATTRIBUTE):
            embeddings = model.get_input_embeddings()
            size, length = self.cfg.pool_size, self.cfg.length
            rows = torch.tensor(init_ids(ctx, 0, size * length, "vocab"), device=embeddings.weight.device)
            prompts = embeddings.weight.detach()[rows].reshape(size, length, -1).clone()
            keys = torch.rand((size, prompts.size(-1)), generator=ctx.generator(KEY_SALT, task=0))
            pool = prompt_pool(prompts.to(ctx.device), keys.to(ctx.device, prompts.dtype))
            model.add_module(ATTRIBUTE, pool)
            pool.hooks = PoolHooks(model, pool, self)
        self.hooks, self.made = getattr(model, ATTRIBUTE).hooks, True
        return getattr(model, ATTRIBUTE)

    def before_task(self, ctx: Context) -> None:
        self.ctx = ctx
        self._bare(ctx).requires_grad_(False)
        self._pool(ctx).requires_grad_(True)
        self.hooks.active = ["pool"] * self.cfg.top_k  # PromptHooks counts the prompt tokens from this list
        self.hooks.counts.zero_()

    def on_resume(self, ctx: Context) -> None:
        """Re-create the pool the checkpoint holds (its weights are loaded next) and the current task's counts
        (a task resumed in its middle does not call ``before_task`` again)."""
        if self.made:
            self.before_task(ctx)
            if self.resumed_counts:
                self.hooks.counts.copy_(torch.tensor(self.resumed_counts))

    def loss(self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        similarity = self.hooks.similarity if self.hooks is not None else None
        if similarity is None:
            return loss
        self.hooks.similarity = None
        ctx.log(l2p_key_similarity=similarity.detach().mean())
        micro = ctx.micro
        # the step's mean over examples of the chosen keys' summed similarity: this micro-batch's part, divided by
        # the weight the loop multiplies the loss by (as base.py says), so grad_accum and ranks change nothing
        examples, weight = (len(micro.step), micro.weight) if micro is not None else (len(similarity), 1.0)
        if weight <= 0 or self.cfg.pull_constraint_coeff == 0:
            return loss
        return loss - self.cfg.pull_constraint_coeff * similarity.sum() / (examples * weight)

    def after_task(self, ctx: Context) -> None:
        self.counts[ctx.task_name] = self.hooks.counts.tolist()

    def takeaway(self, ctx: Context) -> Takeaway:
        return Takeaway(refused="its prompt pool is a cl-runner module chosen per input, "
                                "not a Hugging Face model or a peft "
                                "adapter; the run's checkpoints hold it")

    def accounting(self) -> dict[str, Any]:
        if self.hooks is None:
            return {"l2p_prompt_selections": dict(self.counts)}
        pool = self.hooks.pool
        return {"trainable_parameters": sum(p.numel() for p in pool.parameters()),
                "extra_parameters": sum(p.numel() for p in pool.parameters()),
                "extra_bytes": tensor_bytes(pool.parameters()),
                "prompt_tokens_at_eval": self.cfg.top_k * self.cfg.length,
                "l2p_prompt_selections": dict(self.counts)}

    def state_dict(self) -> dict[str, Any]:
        current = self.hooks.counts.tolist() if self.hooks is not None else []
        return {"made": self.made, "counts": dict(self.counts), "current_counts": current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.made, self.counts = bool(state["made"]), dict(state["counts"])
        self.resumed_counts = list(state["current_counts"])
