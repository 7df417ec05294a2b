"""Dark Experience Replay (Buzzega et al. 2020): DER and DER++ for language models of any kind.

When examples enter the buffer (``insertion``):

- ``step`` (the default; the paper's Algorithm 1, mammoth's ``models/derpp.py``): after every optimizer step the
  step's examples, current task included, are offered to a reservoir buffer (Algorithm R over every training
  example seen, ``ReplayBuffer.reservoir_slots``), each with the logits of that very step: the model's output in
  the training forward its loss was computed from (train mode, ``ctx.autocast()``, before the optimizer step),
  detached. Replay starts at the first task's second step and needs no task boundaries. Which examples enter is
  decided on the host at the step's first micro-batch (it depends only on the counter and a seeded generator),
  so only the entering examples' logits are kept; a step that inserts reads them to the host (one device sync).
  Needs ``sampling: reservoir`` and ``per_task: false``.
- ``task_end`` (our departure, for settings that want the finished model as the teacher): the buffer is filled
  in ``after_task`` under its ``sampling`` rule (``buffer.py``), with the logits of the model at the end of the
  example's task (best weights restored) in eval mode. Nothing is replayed during the first task.

The logits of a causal LM are stored on the example's target positions only (the positions the loss is computed
on: those whose next token is a target), compactly (``compact``): with ``top_k`` unset, every vocabulary logit in
``logit_dtype`` (``V * itemsize`` bytes per target position); with ``top_k = k``, the k largest logits in
``logit_dtype`` and their vocabulary indices as int32 (``k * (itemsize + 4)`` bytes per target position).

Every optimizer step with a non-empty buffer adds, to the step's gradient (after its own backward, before
clipping), the gradients of

    alpha * mean_p D(p)     over the target positions p of one draw of buffer examples
    beta  * mean_p NLL(p)   over those of a second, independent draw (DER++; skipped when beta = 0: DER)

each draw ``min(replay_batch_size, buffer size)`` examples, uniform without replacement (mammoth's
``Buffer.get_data``); no first draw when alpha = 0. ``D`` (``logit_distance``) is, per position:

- ``mse``: the mean over the stored entries (all V, or the k stored) of ``(z_now - z_stored)^2`` (the paper's;
  averaged over positions it is mammoth's ``F.mse_loss`` over every stored entry);
- ``kl``: ``KL(softmax(z_stored) || softmax(z_now))`` over the vocabulary, or with ``top_k`` over the k stored
  tokens, both distributions renormalised on them.

Each term is computed outside the loop's forward (``gem.examples_gradient``: chunked like the step's
micro-batches, each rank its slice, added across ranks), so it does not depend on ``train.grad_accum``,
``train.pack`` or the number of processes beyond float rounding; one extra forward and backward per draw.
Several processes: every rank makes the same reservoir decisions; each keeps the logits of the entering examples
of its own slice of the step, and a sum over ranks (zeros elsewhere) gives every rank all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cl_runner.core.checks import check_choice, check_positive
from cl_runner.core.dist import all_reduce_sum, shard_bounds, world
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import Encoded, pack_rows, target_count, target_mask, token_nll
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, trainable_parameters
from cl_runner.strategies.buffer import GRADIENT_FILL_SALT, BufferConfig, BufferGradients
from cl_runner.strategies.common import evaluating
from cl_runner.strategies.gem import examples_gradient, step_gradients
from cl_runner.strategies.memory import der_logits_bytes, refuse_state_unless_fits

DISTANCES = ("mse", "kl")
LOGIT_DTYPES = ("float16", "bfloat16", "float32")
INSERTIONS = ("step", "task_end")
ID = "der_id"  # the key a buffer example carries: which stored logits are its own
if TYPE_CHECKING:  # an alias read at import would load torch (cl_runner/core/lazy.py)
    Stored = tuple[torch.Tensor, torch.Tensor | None]  # (values (T, V or k), vocabulary indices (T, k) or None)


@dataclass
class DERConfig(BufferConfig):
    name: str = "der"
    replay_batch_size: int = 8  # buffer examples per draw (one draw per term), every optimizer step
    alpha: float = 0.5  # weight of the logit term
    beta: float = 0.5  # weight of the cross-entropy on buffered labels (DER++); 0 is DER
    distance: str = "mse"  # mse | kl
    top_k: int | None = None  # store the k largest logits per target position (None: all of them)
    logit_dtype: str = "float16"  # float16 | bfloat16 | float32
    insertion: str = "step"  # step (the paper's: every step, that step's logits) | task_end (after each task)

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        self.buffer_errors(errs, key)
        for name in ("replay_batch_size", "top_k"):
            check_positive(errs, f"{key}.{name}", getattr(self, name))
        check_choice(errs, f"{key}.distance", self.distance, DISTANCES)
        check_choice(errs, f"{key}.logit_dtype", self.logit_dtype, LOGIT_DTYPES)
        check_choice(errs, f"{key}.insertion", self.insertion, INSERTIONS)
        check_positive(errs, f"{key}.alpha", self.alpha, allow_zero=True)
        check_positive(errs, f"{key}.beta", self.beta, allow_zero=True)
        if not errs and self.alpha == 0 and self.beta == 0:
            errs.append(f"{key}.alpha: alpha and beta are both 0 (nothing replayed); set one above 0 or use "
                        "strategy=naive")
        if self.insertion == "step" and self.sampling != "reservoir":
            errs.append(f"{key}.sampling: insertion=step fills the buffer by reservoir sampling at every step, got "
                        f"{self.sampling!r}; set sampling=reservoir or insertion=task_end")
        if self.insertion == "step" and self.per_task:
            errs.append(f"{key}.per_task: insertion=step keeps one reservoir over every example seen; set "
                        "per_task=false or insertion=task_end")
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


def compact(z: torch.Tensor, top_k: int | None, dtype: torch.dtype) -> Stored:
    """One example's target-position logits (T, V) as stored: all of them in ``dtype``, or the ``top_k`` largest
    per position in ``dtype`` with their vocabulary indices as int32. On ``z``'s device."""
    z = z.detach().float()
    if top_k is None:
        return z.to(dtype), None
    top = z.topk(min(top_k, z.size(-1)), dim=-1)
    return top.values.to(dtype), top.indices.to(torch.int32)


def example_rows(examples: list[Encoded], pack_length: int | None) -> dict[int, tuple[int, int]]:
    """Where each example's target positions lie in ``logits[:, :-1][target_mask(labels)]`` of its training
    batch (row-major): ``i -> (start, end)``. Unpacked, the examples in order; packed (``lm.pack``), in the order
    of the packed rows (``pack_rows``), each example's targets together. Counted on the host."""
    order = (range(len(examples)) if pack_length is None
             else [i for row in pack_rows([len(e["input_ids"]) for e in examples], pack_length) for i in row])
    rows, at = {}, 0
    for i in order:
        rows[i] = (at, at + target_count(examples[i]))
        at = rows[i][1]
    return rows


@no_grad
def stored_logits(ctx: Context, examples: list[Encoded], top_k: int | None, dtype: torch.dtype,
                  batch_size: int) -> dict[int, Stored]:
    """The model's logits on each example's target positions (eval mode, ``ctx.autocast()``), by ``der_id``,
    ``compact``, on the host (``insertion: task_end``)."""
    out: dict[int, Stored] = {}
    with evaluating(ctx.model):
        for start in range(0, len(examples), batch_size):
            part = examples[start : start + batch_size]
            batch = ctx.kind.model_batch(ctx.collate(part), part)  # as the model's kind reads it
            with ctx.autocast():
                logits = ctx.model(**ctx.kind.model_inputs(batch)).logits
            mask = target_mask(batch["labels"])
            for row, example in enumerate(part):
                values, index = compact(logits[row, :-1][mask[row]], top_k, dtype)
                out[example[ID]] = (values.cpu(), None if index is None else index.cpu())
    return out


class DER(BufferGradients):
    """DER / DER++: the buffer's logits (and labels) replayed as extra gradients each step."""

    name = "der"
    Config = DERConfig
    supports = BufferGradients.supports

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.logits: dict[int, Stored] = {}  # der_id -> the stored logits of a buffer example
        self.next_id = 0  # the der_id of the next example stored
        self.fill_rng: torch.Generator | None = None  # insertion=step: the reservoir's draws (GRADIENT_FILL_SALT)
        self.fill_task = -1  # the task whose generator ``fill_rng`` is
        self._distance = torch.zeros(())  # the logit term of the current step, summed over positions
        self._reset_step()

    def _reset_step(self) -> None:
        """The current step's insertion (``step`` mode), empty between steps (so never in a checkpoint)."""
        self._step: list[Encoded] = []  # the step's examples (``ctx.micro.step``)
        self._entering: dict[int, int] | None = None  # step position -> slot of each example that enters
        self._next, self._end = 0, 0  # the step position of this rank's next micro-batch, and its slice's end
        self._captured: dict[int, Stored] = {}  # step position -> logits (on the device) of this rank's entering
        self._width = 0  # entries stored per position (V, or top_k capped at V)

    # ---------------------------------------------------------------------------- insertion=step (per step)

    def loss(self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        loss = super().loss(ctx, batch, outputs, loss)
        if self.cfg.insertion == "step" and ctx.micro is not None:
            self._capture(ctx, batch, outputs.logits)
        return loss

    def _capture(self, ctx: Context, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
        """Keep the logits of this micro-batch's entering examples (the reservoir decides at the step's first)."""
        micro = ctx.micro
        assert micro is not None
        if self._entering is None:
            if self.fill_rng is None or self.fill_task != ctx.task_index:
                self.fill_rng, self.fill_task = ctx.generator(GRADIENT_FILL_SALT), ctx.task_index
            slots = self.buffer.reservoir_slots(ctx.task_index, len(micro.step), self.fill_rng)
            last = {slot: k for k, slot in enumerate(slots) if slot >= 0}  # a later example wins a shared slot
            self._step, self._entering = micro.step, {k: slot for slot, k in last.items()}
            self._next, self._end = shard_bounds(len(micro.step))  # this rank's slice (loop.local_share)
        self._width = logits.size(-1) if self.cfg.top_k is None else min(self.cfg.top_k, logits.size(-1))
        first = self._next
        if first >= self._end:
            return  # the stand-in forward of a rank with no example in this step (weight 0)
        self._next += len(micro.examples)
        mine = [k for k in range(first, first + len(micro.examples)) if k in self._entering]
        if not mine:
            return
        flat = logits.detach()[:, :-1][target_mask(batch["labels"])]
        rows = example_rows(micro.examples, micro.pack_length)
        dtype = getattr(torch, self.cfg.logit_dtype)
        for k in mine:
            start, end = rows[k - first]
            self._captured[k] = compact(flat[start:end], self.cfg.top_k, dtype)

    def _gathered(self, ctx: Context) -> dict[int, Stored]:
        """The entering examples' logits on the host, by step position: under several processes each rank sends
        its own rows, zeros elsewhere, and a sum over ranks assembles them (exact: one non-zero term each)."""
        assert self._entering is not None
        if not world().distributed:
            return {k: (v.cpu(), None if i is None else i.cpu()) for k, (v, i) in self._captured.items()}
        keys = sorted(self._entering)
        counts = [target_count(self._step[k]) for k in keys]
        values = torch.zeros(sum(counts), self._width, dtype=torch.float32, device=ctx.device)
        index = None if self.cfg.top_k is None else torch.zeros_like(values, dtype=torch.int32)
        at = 0
        for k, n in zip(keys, counts, strict=True):
            if k in self._captured:
                v, i = self._captured[k]
                values[at : at + n] = v.float()
                if index is not None:
                    index[at : at + n] = i
            at += n
        all_reduce_sum(values)
        if index is not None:
            all_reduce_sum(index)
        dtype = getattr(torch, self.cfg.logit_dtype)
        parts = values.to(dtype).cpu().split(counts)
        indices = [None] * len(keys) if index is None else index.cpu().split(counts)
        return {k: (v, i) for k, v, i in zip(keys, parts, indices, strict=True)}

    def after_step(self, ctx: Context) -> None:
        """Store the step's entering examples with their logits (mammoth: after ``opt.step()``)."""
        if self._entering is None:
            return
        stored = self._gathered(ctx) if self._entering else {}
        for slot, k in sorted((slot, k) for k, slot in self._entering.items()):  # appends in slot order
            if slot < len(self.buffer):
                self.logits.pop(self.buffer.examples[slot][ID])
            example = {**self._step[k], ID: self.next_id}
            self.buffer.put(slot, ctx.task_index, example)
            self.logits[self.next_id] = stored[k]
            self.next_id += 1
        self._reset_step()
        ctx.log(buffer_examples=len(self.buffer))

    # ---------------------------------------------------------------------------- insertion=task_end

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        examples = [e for task in ctx.train_sets for e in task]
        positions = sum(sum(1 for t in e["labels"] if t != -100) for e in examples) // max(len(examples), 1)
        head = ctx.model.get_output_embeddings() if hasattr(ctx.model, "get_output_embeddings") else None
        vocab = head.weight.shape[0] if head is not None else getattr(ctx.model.config, "vocab_size", 0)
        need = der_logits_bytes(self.cfg.buffer_size, positions, vocab, self.cfg.top_k,
                                getattr(torch, self.cfg.logit_dtype).itemsize)
        refuse_state_unless_fits(ctx.model, ctx.device, need, f"DER's stored logits ({self.cfg.buffer_size} "
                                 f"examples x ~{positions} target tokens)", "strategy.top_k",
                                 "store the k largest logits (strategy.top_k) or lower strategy.buffer_size")

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
        if self.cfg.insertion == "step":
            return
        first = self.next_id
        offered = [{**e, ID: first + i} for i, e in enumerate(ctx.train_sets[ctx.task_index])]
        self.next_id += len(offered)
        self.fill(ctx, offered)
        kept = {e[ID] for e in self.buffer.examples}
        self.logits = {k: v for k, v in self.logits.items() if k in kept}
        new = [e for e in self.buffer.examples if e[ID] >= first]
        dtype = getattr(torch, self.cfg.logit_dtype)
        self.logits.update(stored_logits(ctx, new, self.cfg.top_k, dtype, max(ctx.batch_size, 1)))

    # ---------------------------------------------------------------------------- replay (both modes)

    def logit_term(self, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                   examples: list[Encoded]) -> torch.Tensor:
        """``alpha * sum_p D(p)`` over the target positions of a collated buffer chunk."""
        stored = [self.logits[e[ID]] for e in examples]
        values = torch.cat([v for v, _ in stored]).to(logits.device)
        index = None if stored[0][1] is None else torch.cat([i for _, i in stored]).to(logits.device)
        student = logits[:, :-1][target_mask(batch["labels"])]
        distance = logit_distance(student, values, index, self.cfg.distance).sum()
        self._distance = self._distance.to(distance.device) + distance.detach()
        return self.cfg.alpha * distance

    def label_term(self, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                   examples: list[Encoded]) -> torch.Tensor:
        """``beta * sum_p NLL(p)`` over the target positions of a collated buffer chunk."""
        return self.cfg.beta * token_nll(logits, batch["labels"]).sum()

    @no_grad
    def after_backward(self, ctx: Context) -> None:
        if len(self.buffer) == 0:
            return
        pool, n = list(range(len(self.buffer))), min(self.cfg.replay_batch_size, len(self.buffer))
        grads = step_gradients([p for _, p in trainable_parameters(ctx.model)])
        if self.cfg.alpha > 0:
            examples = self.draw(ctx, pool, n)
            self._distance = torch.zeros(())
            with torch.enable_grad():
                torch._foreach_add_(grads, examples_gradient(ctx, examples, self.chunk, self.logit_term))
            positions = max(sum(len(self.logits[e[ID]][0]) for e in examples), 1)
            ctx.log(der_distance=self._distance / positions)  # this rank's chunks only under several processes
        if self.cfg.beta > 0:
            examples = self.draw(ctx, pool, n)  # DER++'s second, independent draw
            with torch.enable_grad():
                torch._foreach_add_(grads, examples_gradient(ctx, examples, self.chunk, self.label_term))
        self.steps += 1

    def accounting(self) -> dict[str, Any]:
        positions = sum(len(v) for v, _ in self.logits.values())
        stored = sum(v.numel() * v.element_size() + (0 if i is None else i.numel() * i.element_size())
                     for v, i in self.logits.values())
        return {**super().accounting(), "der_logit_positions": positions, "der_logit_bytes": stored,
                "der_logit_bytes_per_position": stored // max(positions, 1),
                "der_extra_backward_per_step": int(self.cfg.alpha > 0) + int(self.cfg.beta > 0)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "logits": dict(self.logits), "next_id": self.next_id,
                "fill_task": self.fill_task, "fill_rng": None if self.fill_rng is None else self.fill_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.logits = {int(k): (v, i) for k, (v, i) in state["logits"].items()}
        self.next_id = int(state["next_id"])
        self.fill_task, self.fill_rng = int(state.get("fill_task", -1)), None
        if state.get("fill_rng") is not None:
            self.fill_rng = torch.Generator()
            self.fill_rng.set_state(state["fill_rng"])
