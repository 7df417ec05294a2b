"""Dark Experience Replay (Buzzega et al. 2020): DER and DER++ for language models of any kind.

The buffer (``buffer.py``, filled in ``after_task``) keeps token ids and, for each kept example, the model's
logits on its target positions at insertion (the model at the end of the example's task, best weights restored).
Stored compactly (``stored_logits``): with ``top_k`` unset, every vocabulary logit in ``logit_dtype``
(``V * itemsize`` bytes per target position); with ``top_k = k``, the k largest logits in ``logit_dtype`` and their
vocabulary indices as int32 (``k * (itemsize + 4)`` bytes per target position).

Every optimizer step adds, to the step's gradient, the gradient of

    alpha * mean_p D(p) + beta * mean_p NLL(p)

over the target positions p of ``replay_batch_size`` buffer examples drawn uniformly (one draw serves both
terms; the paper draws two). ``beta = 0`` is DER, ``beta > 0`` DER++. ``D`` (``logit_distance``) is, per position:

- ``mse``: the mean over the stored entries (all V, or the k stored) of ``(z_now - z_stored)^2`` (the paper's);
- ``kl``: ``KL(softmax(z_stored) || softmax(z_now))`` over the vocabulary, or with ``top_k`` over the k stored
  tokens, both distributions renormalised on them.

The term is computed outside the loop's forward (``gem.examples_gradient``: chunked like the step's micro-batches,
each rank its slice, added across ranks), so it does not depend on ``train.grad_accum``, ``train.pack`` or the
number of processes beyond float rounding; one extra forward and backward per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cl_runner.core.checks import check_choice, check_positive
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import Encoded, target_mask, token_nll
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, trainable_parameters
from cl_runner.strategies.buffer import BufferConfig, BufferGradients
from cl_runner.strategies.common import evaluating
from cl_runner.strategies.gem import examples_gradient, step_gradients

DISTANCES = ("mse", "kl")
LOGIT_DTYPES = ("float16", "bfloat16", "float32")
ID = "der_id"  # the key a buffer example carries: which stored logits are its own
if TYPE_CHECKING:  # an alias read at import would load torch (cl_runner/core/lazy.py)
    Stored = tuple[torch.Tensor, torch.Tensor | None]  # (values (T, V or k), vocabulary indices (T, k) or None)


@dataclass
class DERConfig(BufferConfig):
    name: str = "der"
    replay_batch_size: int = 8  # buffer examples per optimizer step (both terms)
    alpha: float = 0.5  # weight of the logit term
    beta: float = 0.5  # weight of the cross-entropy on buffered labels (DER++); 0 is DER
    distance: str = "mse"  # mse | kl
    top_k: int | None = None  # store the k largest logits per target position (None: all of them)
    logit_dtype: str = "float16"  # float16 | bfloat16 | float32

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        self.buffer_errors(errs, key)
        for name in ("replay_batch_size", "top_k"):
            check_positive(errs, f"{key}.{name}", getattr(self, name))
        check_choice(errs, f"{key}.distance", self.distance, DISTANCES)
        check_choice(errs, f"{key}.logit_dtype", self.logit_dtype, LOGIT_DTYPES)
        check_positive(errs, f"{key}.alpha", self.alpha, allow_zero=True)
        check_positive(errs, f"{key}.beta", self.beta, allow_zero=True)
        if not errs and self.alpha == 0 and self.beta == 0:
            errs.append(f"{key}.alpha: alpha and beta are both 0 (nothing replayed); set one above 0 or use "
                        "strategy=naive")
        return errs


def logit_distance(student: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None,
                   distance: str) -> torch.Tensor:
    """Per target position (rows), ``D`` between the student's logits ``student`` (T, V) and the stored ``values``
    (T, V, or T, k at vocabulary ``index``): see the module docstring. Float32."""
    student = (student if index is None else student.gather(1, index.long())).float()
    values = values.float()
    if distance == "mse":
        return (student - values).square().mean(-1)
    teacher = torch.log_softmax(values, -1)
    return (teacher.exp() * (teacher - torch.log_softmax(student, -1))).sum(-1)


@no_grad
def stored_logits(ctx: Context, examples: list[Encoded], top_k: int | None, dtype: torch.dtype,
                  batch_size: int) -> dict[int, Stored]:
    """The model's logits on each example's target positions (eval mode, ``ctx.autocast()``), by ``der_id``:
    all of them, or the ``top_k`` largest with their indices, in ``dtype`` on the host."""
    out: dict[int, Stored] = {}
    with evaluating(ctx.model):
        for start in range(0, len(examples), batch_size):
            part = examples[start : start + batch_size]
            batch = ctx.kind.model_batch(ctx.collate(part), part)  # as the model's kind reads it
            with ctx.autocast():
                logits = ctx.model(**ctx.kind.model_inputs(batch)).logits
            mask = target_mask(batch["labels"])
            for row, example in enumerate(part):
                z = logits[row, :-1][mask[row]].float()
                if top_k is None:
                    out[example[ID]] = (z.to(dtype).cpu(), None)
                else:
                    top = z.topk(min(top_k, z.size(-1)), dim=-1)
                    out[example[ID]] = (top.values.to(dtype).cpu(), top.indices.to(torch.int32).cpu())
    return out


class DER(BufferGradients):
    """DER / DER++: the buffer's logits (and labels) replayed as an extra gradient each step."""

    name = "der"
    Config = DERConfig
    supports = BufferGradients.supports

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.logits: dict[int, Stored] = {}  # der_id -> the stored logits of a buffer example
        self.next_id = 0  # the der_id of the next example offered
        self._distance = torch.zeros(())  # the logit term of the current step, summed over positions

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """The buffer, and its logits at the examples' target positions (``top_k``: the k largest with their
        int32 indices). An upper bound: the answers' lengths are not known before the tasks load, so every
        position but the first of a ``max_length``-token example counts as a target (a prompt-answer task
        stores only its answer tokens: far fewer)."""
        itemsize = getattr(torch, self.cfg.logit_dtype).itemsize
        per_position = self.cfg.top_k * (itemsize + 4) if self.cfg.top_k else size.vocab * itemsize
        return super().memory_needs(size) + StateNeeds(
            local_bytes=self.cfg.buffer_size * (size.max_length - 1) * per_position)

    def after_task(self, ctx: Context) -> None:
        first = self.next_id
        offered = [{**e, ID: first + i} for i, e in enumerate(ctx.train_sets[ctx.task_index])]
        self.next_id += len(offered)
        self.fill(ctx, offered)
        kept = {e[ID] for e in self.buffer.examples}
        self.logits = {k: v for k, v in self.logits.items() if k in kept}
        new = [e for e in self.buffer.examples if e[ID] >= first]
        dtype = getattr(torch, self.cfg.logit_dtype)
        self.logits.update(stored_logits(ctx, new, self.cfg.top_k, dtype, max(ctx.batch_size, 1)))

    def term(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], examples: list[Encoded]) -> torch.Tensor:
        """``alpha * sum_p D(p) + beta * sum_p NLL(p)`` over the target positions of a collated buffer chunk."""
        stored = [self.logits[e[ID]] for e in examples]
        values = torch.cat([v for v, _ in stored]).to(logits.device)
        index = None if stored[0][1] is None else torch.cat([i for _, i in stored]).to(logits.device)
        student = logits[:, :-1][target_mask(batch["labels"])]
        distance = logit_distance(student, values, index, self.cfg.distance).sum()
        self._distance = self._distance.to(distance.device) + distance.detach()
        return self.cfg.alpha * distance + self.cfg.beta * token_nll(logits, batch["labels"]).sum()

    @no_grad
    def after_backward(self, ctx: Context) -> None:
        if len(self.buffer) == 0:
            return
        examples = self.draw(ctx, list(range(len(self.buffer))), self.cfg.replay_batch_size)
        self._distance = torch.zeros(())
        with torch.enable_grad():
            extra = examples_gradient(ctx, examples, self.chunk, self.term)
        torch._foreach_add_(step_gradients([p for _, p in trainable_parameters(ctx.model)]), extra)
        positions = max(sum(len(self.logits[e[ID]][0]) for e in examples), 1)
        self.steps += 1
        ctx.log(der_distance=self._distance / positions)  # this rank's chunks only under several processes

    def accounting(self) -> dict[str, Any]:
        positions = sum(len(v) for v, _ in self.logits.values())
        stored = sum(v.numel() * v.element_size() + (0 if i is None else i.numel() * i.element_size())
                     for v, i in self.logits.values())
        return {**super().accounting(), "der_logit_positions": positions, "der_logit_bytes": stored,
                "der_logit_bytes_per_position": stored // max(positions, 1), "der_extra_backward_per_step": 1}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "logits": dict(self.logits), "next_id": self.next_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.logits = {int(k): (v, i) for k, (v, i) in state["logits"].items()}
        self.next_id = int(state["next_id"])
