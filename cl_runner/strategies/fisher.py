"""Diagonal Fisher of a causal LM: a batched per-example-gradient estimator and its brute-force reference.

Both return, for every selected parameter, ``F = 1/N * sum_n g_n**2`` with ``g_n`` the gradient of example n's
*mean* target-token NLL (the per-example analogue of the training loss, so F has the scale of the squared
gradients the optimizer sees and does not grow with the target length). Examples without target tokens count
in N with a zero gradient. The model is put in eval mode (no dropout) and run under ``ctx.autocast()``.

``mode="empirical"`` uses the data's labels. ``mode="sampled"`` first replaces each target token by a draw
from the model's predictive distribution at that position (teacher-forced on the data prefix: one forward
pass, not autoregressive generation); the uniform numbers are drawn from ``generator`` example by example, so
the samples do not depend on batching and both estimators see the same labels for the same seed.

Several processes (``fisher_diagonal``). DDP: each rank takes its contiguous slice of the examples
(``dist.shard_bounds``), sums its examples' squared gradients, and the sums are added across ranks: the
single-process sum, up to the order of float additions. The uniforms of ``sampled`` are drawn for every example
on every rank (the same stream), each rank then labels its slice. FSDP: a backward reduce-scatters the gradient
across ranks, so per-example gradients cannot be taken rank by rank; every rank runs the same examples, one
forward and backward each, and the reduce-scatter averages identical gradients: each rank's shard of ``.grad``
is exactly its shard of ``g_n``, squared and summed into its shard of F (no full copy anywhere; the cost per rank
is that of one process, not a 1/N share).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from cl_runner.core.dist import all_reduce_sum, shard_bounds, world
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import IGNORE_INDEX, Encoded, causal_lm_loss
from cl_runner.strategies.base import Context
from cl_runner.strategies.common import evaluating, local, selected_parameters

MODES = ("empirical", "sampled")
Objective = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (logits, labels) of one example -> scalar
Transform = Callable[["torch.Tensor"], "torch.Tensor"]  # a gradient -> what is summed over examples (g**2, |g|)


@no_grad
def sample_targets(ctx: Context, examples: Sequence[Encoded], generator: torch.Generator | None,
                   batch_size: int = 16, uniforms: list[torch.Tensor] | None = None) -> list[Encoded]:
    """Copies of ``examples`` whose target labels are drawn from the model (inverse CDF of its softmax); the
    uniforms come from ``generator``, one tensor per example, unless given (``uniforms``)."""
    if uniforms is None:
        uniforms = [torch.rand(len(e["input_ids"]), generator=generator) for e in examples]
    sampled: list[Encoded] = []
    with evaluating(ctx.model):
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start : start + batch_size])
            batch = ctx.collate(chunk)
            with ctx.autocast():
                out = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            cdf = torch.softmax(out.logits[:, :-1].float(), -1).cumsum(-1)  # position t predicts token t + 1
            for row, example in enumerate(chunk):
                n = len(example["input_ids"])
                u = uniforms[start + row][1:n].to(cdf.device).unsqueeze(-1) * cdf[row, : n - 1, -1:]
                draws = torch.searchsorted(cdf[row, : n - 1].contiguous(), u).squeeze(-1)
                draws = draws.clamp_max(cdf.size(-1) - 1).tolist()
                labels = [example["labels"][0]] + [
                    IGNORE_INDEX if old == IGNORE_INDEX else new
                    for old, new in zip(example["labels"][1:], draws, strict=True)
                ]
                sampled.append({**example, "labels": labels})
    return sampled


def _labelled(ctx: Context, examples: Sequence[Encoded], mode: str, generator: torch.Generator | None,
              batch_size: int, part: tuple[int, int] | None = None) -> list[Encoded]:
    """The examples ``part`` (a slice ``[start, end)``; all when None) with the labels ``mode`` uses."""
    if mode not in MODES:
        raise ValueError(f"fisher: expected one of {', '.join(MODES)}, got {mode!r}")
    start, end = part or (0, len(examples))
    if mode == "empirical":
        return list(examples[start:end])
    if generator is None:
        raise ValueError("fisher=sampled needs a seeded generator")
    uniforms = [torch.rand(len(e["input_ids"]), generator=generator) for e in examples]  # all: the same stream
    return sample_targets(ctx, examples[start:end], None, batch_size, uniforms[start:end])


def fisher_diagonal_loop(ctx: Context, examples: Sequence[Encoded], *, mode: str = "empirical",
                         generator: torch.Generator | None = None,
                         param_regex: str | None = None) -> dict[str, torch.Tensor]:
    """Reference: one forward and backward per example (batch size 1), in one process. Slow; for tests and
    benchmarks."""
    named = selected_parameters(ctx.model, param_regex)
    sums = _loop_sums(ctx, _labelled(ctx, examples, mode, generator, batch_size=16), named)
    return {n: f / max(len(examples), 1) for n, f in sums.items()}


def square(g: torch.Tensor) -> torch.Tensor:
    return g.square()


def _one_loss(ctx: Context, example: Encoded, objective: Objective = causal_lm_loss) -> torch.Tensor:
    batch = ctx.kind.model_batch(ctx.collate([example]), [example])  # as the model's kind reads it
    with ctx.autocast():
        out = ctx.model(**ctx.kind.model_inputs(batch))
    return objective(out.logits, batch["labels"])


def _loop_sums(ctx: Context, labelled: Sequence[Encoded], named: list, objective: Objective = causal_lm_loss,
               transform: Transform = square) -> dict[str, torch.Tensor]:
    """``sum_n g_n**2`` (``transform(g_n)``) with one ``autograd.grad`` per example (no ``.grad`` touched)."""
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    with evaluating(ctx.model):
        for example in labelled:
            grads = torch.autograd.grad(_one_loss(ctx, example, objective), [p for _, p in named],
                                        allow_unused=True)
            for (n, _), g in zip(named, grads, strict=True):
                if g is not None:
                    fisher[n] += transform(g.float())
    return fisher


def _sharded_sums(ctx: Context, labelled: Sequence[Encoded], named: list, objective: Objective = causal_lm_loss,
                  transform: Transform = square) -> dict[str, torch.Tensor]:
    """FSDP: this rank's shards of ``sum_n g_n**2``, every rank running the same examples (module docstring).
    ``backward`` fills ``.grad`` (which it must: autograd.grad does not reach sharded parameters); the gradients
    are cleared before and after."""
    fisher = {n: torch.zeros_like(local(p), dtype=torch.float32) for n, p in named}
    with evaluating(ctx.model):
        for example in labelled:
            ctx.model.zero_grad(set_to_none=True)
            _one_loss(ctx, example, objective).backward()
            for n, p in named:
                if p.grad is not None:
                    fisher[n] += transform(local(p.grad).float())
    ctx.model.zero_grad(set_to_none=True)
    return fisher


def fisher_diagonal(ctx: Context, examples: Sequence[Encoded], *, mode: str = "empirical",
                    generator: torch.Generator | None = None, param_regex: str | None = None,
                    batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``batch_size`` examples at a time with ``vmap(grad(functional_call))``.

    Padding: each example's loss is computed on its right-padded row *without* an attention mask. In a causal
    model a position only attends to earlier ones, so padding on the right never reaches a real position, and
    the padded labels are ``-100``: the per-example loss equals the unpadded one. (Hugging Face models branch
    on the mask's values, which vmap cannot trace; for the same reason their padding check on ``input_ids``
    is switched off during the pass.) Examples are sorted by length so chunks carry little padding. Should
    vmap still fail on some architecture, this warns and falls back to the loop on the same labels. Several
    processes: see the module docstring (FSDP runs the loop form; the result is this rank's shard of F).
    """
    return gradient_mean(ctx, examples, param_regex=param_regex, batch_size=batch_size,
                         label=lambda part: _labelled(ctx, examples, mode, generator, batch_size, part))


def gradient_mean(ctx: Context, examples: Sequence[Encoded], *, objective: Objective = causal_lm_loss,
                  transform: Transform = square, param_regex: str | None = None, batch_size: int = 16,
                  label: Callable[[tuple[int, int] | None], list[Encoded]] | None = None) -> dict[str, torch.Tensor]:
    """``1/N sum_n transform(g_n)``, ``g_n`` the gradient of ``objective(logits, labels)`` on example n alone:
    ``fisher_diagonal``'s machinery (batched per-example gradients, the DDP split, the FSDP loop) for any
    per-example scalar (MAS: the squared norm of the outputs, summing ``|g_n|``). ``label(part)``
    gives the examples of ``part`` (a slice; None = all) as the objective sees them (default: as they are)."""
    named = selected_parameters(ctx.model, param_regex)
    label = label or (lambda part: list(examples[slice(*part)] if part else examples))
    if world().sharded:
        sums = _sharded_sums(ctx, label(None), named, objective, transform)
    else:
        part = shard_bounds(len(examples)) if world().distributed else None
        sums = _batched_sums(ctx, label(part), named, batch_size, objective, transform)
        for f in sums.values() if world().distributed else ():
            all_reduce_sum(f)
    return {n: f / max(len(examples), 1) for n, f in sums.items()}


def _batched_sums(ctx: Context, labelled: list[Encoded], named: list, batch_size: int,
                  objective: Objective = causal_lm_loss, transform: Transform = square) -> dict[str, torch.Tensor]:
    """``sum_n transform(g_n)`` over ``labelled`` with ``vmap`` (``fisher_diagonal``); the loop when vmap fails."""
    model = ctx.model
    if ctx.kind.padding_needs_mask:  # an encoder does, and vmap cannot take the mask (docstring above)
        return _loop_sums(ctx, labelled, named, objective, transform)
    chosen = {n for n, _ in named}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    buffers = dict(model.named_buffers())

    def example_loss(params: dict[str, torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor):
        out = torch.func.functional_call(model, (params, frozen, buffers), args=(),
                                         kwargs={"input_ids": input_ids[None], "use_cache": False})
        return objective(out.logits, labels[None])

    per_example_grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))
    params = {n: p.detach() for n, p in named}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    order = sorted(range(len(labelled)), key=lambda i: len(labelled[i]["input_ids"]))
    try:
        with evaluating(model), _without_pad_token_check(model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not yet implemented the batching rule.*")
            for start in range(0, len(order), batch_size):
                batch = ctx.collate([labelled[i] for i in order[start : start + batch_size]])
                mask = batch["attention_mask"]
                if not bool((mask[:, 1:] <= mask[:, :-1]).all()):
                    raise ValueError("fisher_diagonal needs right-padded batches (ctx.collate pads left)")
                with ctx.autocast():
                    grads = per_example_grads(params, batch["input_ids"], batch["labels"])
                for n, g in grads.items():
                    fisher[n] += transform(g.float()).sum(0)
    except RuntimeError as exc:
        if "vmap" not in str(exc):
            raise
        warnings.warn(f"fisher_diagonal: vmap failed ({str(exc)[:200]}); using the per-example loop",
                      RuntimeWarning, stacklevel=3)
        return _loop_sums(ctx, labelled, named, objective, transform)
    return fisher


@contextmanager
def _without_pad_token_check(model: torch.nn.Module) -> Iterator[None]:
    """Hide ``config.pad_token_id`` (only read to warn about padding without a mask) for the vmap pass."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        yield
        return
    config.pad_token_id = None
    try:
        yield
    finally:
        config.pad_token_id = pad
