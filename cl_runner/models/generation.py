"""Greedy generation over a KV cache, shared by every model kind: the transformers ``Cache`` API under the keyword
the installed version takes (no deprecated form), left padding, and the decoding loop: each row stops at EOS or
the end-of-turn token and leaves the batch (its KV cache rows dropped), so long answers cost only their own rows
(under FSDP every rank steps until the last rank's rows are done, since each forward is a collective)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from cl_runner.core.dist import all_reduce_max, world


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward takes its KV cache under: ``cache`` (recent transformers 5) or
    ``past_key_values`` (earlier); the first Hugging Face model inside ``model`` (peft, FSDP) decides."""
    from transformers import PreTrainedModel

    hf_model = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    return _forward_keyword(type(hf_model))


@functools.cache
def _forward_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cached_forward(model: torch.nn.Module, cache: Any, **inputs: Any) -> tuple[Any, Any]:
    """``model(**inputs)`` reading and extending a KV cache (a transformers ``Cache``, the ``DynamicCache`` the
    model makes on the first call, when ``cache`` is None); returns (output, cache). The cache goes in and comes
    out under the name the installed transformers uses, so no deprecation warning (LAMOL's sampling uses it too)."""
    keyword = cache_keyword(model)
    out = model(**inputs, **({keyword: cache} if cache is not None else {}), use_cache=True)
    return out, getattr(out, keyword)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - len(p) :] = torch.tensor(p)
        mask[row, length - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _all_done(done: bool) -> bool:
    """Whether every rank's generation is done; each rank's own flag except under FSDP (forwards are
    collectives, so all ranks step until the last is done)."""
    if not world().sharded:
        return done
    return all_reduce_max([0.0 if done else 1.0])[0] == 0.0


if TYPE_CHECKING:  # evaluated, the aliases would load torch when a config check imports kinds.py (start-up)
    Forward = Callable[[torch.Tensor | None, Any], tuple[torch.Tensor, Any]]
    Select = Callable[[torch.Tensor, Any], Any]


def greedy_loop(scorer: Any, n: int, max_new_tokens: int, dummy: bool, forward: Forward,
                select: Select) -> list[list[int]]:
    """The greedy decoding loop of every model kind: ``forward(the last tokens (A, 1), or None at the first step;
    cache)`` returns the next-token logits (A, V) of the A rows still in the batch and the cache. A row ends at
    EOS or one of ``scorer.stop_ids`` (a chat template's end-of-turn) and leaves the batch: ``select(indices,
    cache)`` keeps only those rows in the forward's state (its cache, mask, positions) and returns the cache, so a
    long answer costs its own row's steps, not the whole batch's. Rows come back in prompt order, without their
    last (stop) token. Each row's tokens are those of the row decoded alone: the rows never attend to each other.
    Under FSDP every rank steps until every rank's rows are done (a forward is a collective), keeping one row
    when all of its own are done; a ``dummy`` batch is done from the start."""
    stops = {scorer.eos_id, *scorer.stop_ids}
    rows: list[list[int]] = [[] for _ in range(n)]
    batch = list(range(n))  # the prompt each row of the forward's batch belongs to
    alive = [not dummy] * n
    cache, token = None, None
    for _ in range(max_new_tokens):
        with scorer.autocast():
            logits, cache = forward(None if token is None else token[:, None], cache)
        token = logits.argmax(-1)
        for row, t in zip(batch, token.tolist(), strict=True):  # one transfer per step
            if alive[row]:
                alive[row] = t not in stops
                if alive[row]:
                    rows[row].append(t)
        if _all_done(not any(alive)):
            break
        keep = [k for k, row in enumerate(batch) if alive[row]] or [0]  # FSDP: a done rank steps on with one row
        if len(keep) < len(batch):
            index = torch.tensor(keep, device=token.device)
            cache, token, batch = select(index, cache), token[index], [batch[k] for k in keep]
    return rows
