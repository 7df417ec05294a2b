"""Orthogonal Gradient Descent (Farajtabar et al., AISTATS 2020): after each task, gradient directions of that
task's examples are stored, orthonormalised; every later step's gradient is projected onto their orthogonal
complement, so to first order a step leaves the model's outputs on those examples unchanged.

What is stored. After task t (except the last: no step would use its directions) ``n_t`` of its training examples
are drawn (seeded, without replacement) and, with the model in eval mode, each one's gradient w.r.t. the trainable
parameters is taken of
- ``direction: logit``: the sum of the ground-truth logits at its target positions (the paper's OGD-GTL, its best
  variant: the gradient of the output for the true label, one example at a time), or
- ``direction: nll``: its summed target-token NLL (a loss gradient, as TRACE's ``model/Regular/OGD.py`` stores).
Each gradient is orthonormalised against the basis by Gram-Schmidt, run twice ("twice is enough": one pass loses
orthogonality in float32 once many directions are stored), and dropped when what is left of it is below
``DEPENDENT`` of its norm (the basis already spans it).

The projection (``after_backward``, on the step's complete gradient g, before clipping): ``g <- g - B^T (B g)``
with B the stored orthonormal directions, per parameter two matrix products with its block of B; the dots are
summed over parameters (and over ranks' shards under FSDP) once.

Memory. A direction is one copy of every trainable parameter (4 bytes each, 2 with ``state_dtype: bfloat16``), so
``n_t = min(directions_per_task, the task's training examples, max_basis_mb / (tasks - 1) / one direction)``:
every earlier task gets the same share and the basis never exceeds ``max_basis_mb``. A budget too small for one
direction per earlier task is refused in ``check``. Under DDP every rank holds the whole basis; under FSDP each rank
holds the shards of its parameter shards (``common.local``), checkpointed as DTensors laid out like them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_choice, check_positive
from cl_runner.core.dist import all_reduce_sum, world
from cl_runner.core.errors import ConfigError
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import Encoded, target_mask
from cl_runner.strategies.anchor import DTYPES
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Strategy, StrategyConfig, trainable_parameters
from cl_runner.strategies.common import evaluating, local, shard_like, sharded_view
from cl_runner.strategies.gem import dot_all, examples_gradient, nll_sum, step_gradients
from cl_runner.strategies.memory import ogd_basis_bytes, refuse_state_unless_fits
from cl_runner.strategies.support import Refused, Supports

SAMPLE_SALT = 71  # ctx.generator salt: which examples of a finished task give its directions
DEPENDENT = 1e-4  # a gradient keeping less than this share of its norm after Gram-Schmidt is already spanned
MIB = 2**20


def ground_truth_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor], examples: list[Encoded]) -> torch.Tensor:
    """The sum, over the target positions of a collated batch, of the logit of the true next token (OGD-GTL)."""
    labels = batch["labels"]
    picked = logits[:, :-1].float().gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * target_mask(labels)).sum()


TERMS = {"logit": ground_truth_logits, "nll": nll_sum}

# ------------------------------------------------------------------------------------------ the mathematics
# A basis is one block per parameter: (directions, elements of this rank's shard of the parameter); a vector
# (a gradient, a direction being made) is one tensor per parameter, of any shape.


def basis_dots(blocks: list[torch.Tensor], vector: list[torch.Tensor]) -> torch.Tensor:
    """``B v`` (fp32, one entry per direction), summed over parameters and, under FSDP, over ranks' shards."""
    dots = sum(b.float() @ v.reshape(-1).float() for b, v in zip(blocks, vector, strict=True))
    return all_reduce_sum(dots) if world().sharded else dots


@no_grad
def project_out_(blocks: list[torch.Tensor], vector: list[torch.Tensor]) -> torch.Tensor:
    """``v <- v - B^T (B v)`` in place (B orthonormal: the part of v in the basis's span is removed); returns B v."""
    dots = basis_dots(blocks, vector)
    for b, v in zip(blocks, vector, strict=True):
        v.sub_((dots @ b.float()).view_as(v).to(v.dtype))
    return dots


@no_grad
def orthonormalise(blocks: list[torch.Tensor], vector: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """``vector`` (fp32) with its part in the span of ``blocks`` removed (two passes) and scaled to norm 1, as one
    row per block; None when less than ``DEPENDENT`` of its norm is left (or it is zero)."""
    norm = float(dot_all(vector, vector).sqrt())
    if norm == 0.0:
        return None
    for _ in range(2):
        if len(blocks[0]):
            project_out_(blocks, vector)
    left = float(dot_all(vector, vector).sqrt())
    if left <= DEPENDENT * norm:
        return None
    return [v.reshape(-1) / left for v in vector]


# ------------------------------------------------------------------------------------------- the strategy


@dataclass
class OGDConfig(StrategyConfig):
    name: str = "ogd"
    directions_per_task: int = 200  # gradients stored per finished task (the paper's; TRACE's OGD.py: 150)
    max_basis_mb: float = 2048.0  # the stored basis's memory cap (MiB), shared equally by the earlier tasks
    direction: str = "logit"  # logit: gradient of the true tokens' logits (OGD-GTL) | nll: of the loss (TRACE)
    state_dtype: str = "float32"  # dtype of the stored basis: float32 | bfloat16 (half the memory)

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.directions_per_task", self.directions_per_task)
        check_positive(errs, f"{key}.max_basis_mb", self.max_basis_mb)
        check_choice(errs, f"{key}.direction", self.direction, tuple(TERMS))
        check_choice(errs, f"{key}.state_dtype", self.state_dtype, tuple(DTYPES))
        return errs


class OGD(Strategy):
    """Orthogonal Gradient Descent: an orthonormal basis of old tasks' gradients (``after_task``), projected out
    of every later step's gradient (``after_backward``). See the module docstring for what is stored."""

    name = "ogd"
    Config = OGDConfig
    supports = Supports(encoder_decoder=Refused("its stored directions read the logits in the causal layout (not yet "
                                                "through the model kind)"))

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.dtype = getattr(torch, cfg.state_dtype)
        self.names: list[str] | None = None  # the trainable parameters the basis covers (fixed at the first task)
        self.blocks: list[Any] = []  # per parameter: (directions, local elements); as saved until ``_place``
        self.kept: dict[str, int] = {}  # task name -> directions it added
        self.numel = 0  # elements of one direction (every rank's shards together)
        self.projected = 0  # optimizer steps whose gradient was projected
        self.gradients = 0  # per-example gradients computed at task ends (one forward and backward each)
        self._params: tuple[int, list[torch.Tensor]] | None = None  # cached (id(model), parameters)

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """The basis: ``directions_per_task`` per earlier task, at most ``max_basis_mb``."""
        directions = self.cfg.directions_per_task * max(size.tasks - 1, 0)
        basis = min(directions * size.parameters * self.dtype.itemsize, int(self.cfg.max_basis_mb * 2**20))
        return StateNeeds(sharded_bytes=basis)

    def share(self, ctx: Context) -> tuple[int, int]:
        """(bytes of one direction, directions each earlier task may store under ``max_basis_mb``)."""
        numel = sum(p.numel() for _, p in trainable_parameters(ctx.model))
        one = numel * self.dtype.itemsize
        return one, int(self.cfg.max_basis_mb * MIB // max(one, 1) // max(len(ctx.task_names) - 1, 1))

    def check(self, ctx: Context) -> None:
        one, share = self.share(ctx)
        if share == 0 and len(ctx.task_names) > 1:
            raise ConfigError(f"strategy.max_basis_mb: one OGD direction of this model is {one / MIB:,.1f} MiB (a "
                              f"{self.cfg.state_dtype} copy of every trainable parameter), and {self.cfg.max_basis_mb}"
                              f" MiB holds fewer than one per earlier task ({len(ctx.task_names) - 1}); raise "
                              "max_basis_mb or set state_dtype=bfloat16")
        numel = sum(p.numel() for _, p in trainable_parameters(ctx.model))
        basis = ogd_basis_bytes(numel, len(ctx.task_names), self.cfg.directions_per_task, self.cfg.max_basis_mb,
                                self.dtype.itemsize)
        refuse_state_unless_fits(ctx.model, ctx.device, basis + 4 * numel, "OGD's basis and one gradient",
                                 "strategy.max_basis_mb", "lower strategy.max_basis_mb or set state_dtype=bfloat16")

    def parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        if self._params is None or self._params[0] != id(model):
            named = dict(model.named_parameters())
            self._params = (id(model), [named[n] for n in self.names or []])
        return self._params[1]

    def after_task(self, ctx: Context) -> None:
        if ctx.task_index >= len(ctx.task_names) - 1:
            return  # the last task: no later step would be projected
        if self.names is None:
            self.names = [n for n, _ in trainable_parameters(ctx.model)]
            self.numel = sum(p.numel() for _, p in trainable_parameters(ctx.model))
        if [n for n, _ in trainable_parameters(ctx.model)] != self.names:
            raise RuntimeError("ogd: the trainable parameters changed since its basis was made")
        params = self.parameters(ctx.model)
        self._place(params)
        examples = ctx.train_sets[ctx.task_index]
        count = min(self.cfg.directions_per_task, len(examples), self.share(ctx)[1])
        order = torch.randperm(len(examples), generator=ctx.generator(SAMPLE_SALT))[:count].tolist()
        old = len(self.blocks[0])
        blocks = [torch.cat([b, b.new_empty((count, b.shape[1]))]) for b in self.blocks]  # room for the new rows
        self.blocks, rows = [], old
        with evaluating(ctx.model):  # the trained model's function: no dropout
            for i in order:
                vector = [g.float() for g in examples_gradient(ctx, [examples[i]], 1, TERMS[self.cfg.direction])]
                made = orthonormalise([b[:rows] for b in blocks], vector)
                if made is not None:
                    for b, r in zip(blocks, made, strict=True):
                        b[rows] = r
                    rows += 1
        self.blocks = [b[:rows].clone() if rows < len(b) else b for b in blocks]  # clone: free the unused rows
        self.kept[ctx.task_names[ctx.task_index]] = rows - old
        self.gradients += len(order)
        ctx.log(ogd_directions=float(rows))

    @no_grad
    def after_backward(self, ctx: Context) -> None:
        if not self.blocks or not len(self.blocks[0]):
            return
        params = self.parameters(ctx.model)
        self._place(params)
        grads = step_gradients(params)
        before = dot_all(grads, grads)
        dots = project_out_(self.blocks, grads)
        self.projected += 1
        ctx.log(ogd_removed=(dots.square().sum() / before.clamp_min(1e-30)).sqrt())  # |B g| / |g|, no host sync

    def _place(self, params: list[torch.Tensor]) -> None:
        """The basis as plain blocks of this rank's shards on the parameters' device (a checkpoint holds it on the
        CPU, whole, or as DTensor rows); an empty block for every parameter before the first task ends."""
        if not self.blocks:
            self.blocks = [torch.empty((0, local(p).numel()), dtype=self.dtype, device=local(p).device)
                           for p in params]
        self.blocks = [self._placed(b, p) for b, p in zip(self.blocks, params, strict=True)]

    def _placed(self, block: Any, param: torch.Tensor) -> torch.Tensor:
        shard = local(param)
        if isinstance(block, torch.Tensor) and block.shape[1] == shard.numel():
            return block.to(shard.device)  # itself when already placed
        rows = [shard_like(r if hasattr(r, "to_local") else r.reshape(param.shape), param).reshape(-1) for r in block]
        return (torch.stack(rows).to(self.dtype) if rows
                else torch.empty((0, shard.numel()), dtype=self.dtype, device=shard.device))

    def accounting(self) -> dict[str, Any]:
        """Sizes of the whole basis (every rank's shards together: the same at any process count)."""
        directions = sum(self.kept.values())
        return {"ogd_directions": directions, "ogd_directions_per_task": dict(self.kept),
                "ogd_bytes_per_direction": self.numel * self.dtype.itemsize,
                "ogd_basis_bytes": directions * self.numel * self.dtype.itemsize,
                "ogd_extra_backward_at_task_end": self.gradients, "ogd_projected_steps": self.projected}

    def state_dict(self) -> dict[str, Any]:
        """The basis; under FSDP each direction as one DTensor per parameter, laid out like the parameter."""
        blocks = self.blocks
        params = self._params[1] if self._params else []
        if params and world().sharded and blocks and isinstance(blocks[0], torch.Tensor):
            blocks = [[sharded_view(r.view(local(p).shape), p) for r in b] for b, p in zip(blocks, params, strict=True)]
        return {"names": self.names, "blocks": blocks, "kept": dict(self.kept), "numel": self.numel,
                "projected": self.projected, "gradients": self.gradients}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names, self.blocks, self.kept = state["names"], list(state["blocks"]), dict(state["kept"])
        self.numel, self.projected, self._params = int(state["numel"]), int(state["projected"]), None
        self.gradients = int(state["gradients"])
