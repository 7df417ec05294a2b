"""Greedy generation over a KV cache, shared by every model kind: the transformers ``Cache`` API under the keyword
the installed version takes (no deprecated form), left padding, and the decoding loop that stops at EOS (under
FSDP every rank steps until the last rank's rows are done, since each forward is a collective)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

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


def greedy_loop(scorer: Any, n: int, max_new_tokens: int, dummy: bool,
                forward: Callable[[torch.Tensor | None, Any], tuple[torch.Tensor, Any]]) -> list[list[int]]:
    """The greedy decoding loop of every model kind: ``forward(the last tokens (n, 1), or None at the first
    step; cache)`` returns the next-token logits (n, V) and the cache. Stops when every row has ended with EOS or
    one of ``scorer.stop_ids`` (a chat template's end-of-turn; under FSDP: every rank's rows); the rows come back
    without that last token."""
    ends = torch.tensor([scorer.eos_id, *scorer.stop_ids], device=scorer.device)
    finished = torch.full((n,), dummy, dtype=torch.bool, device=scorer.device)
    generated, cache, token = [], None, None
    for _ in range(max_new_tokens):
        with scorer.autocast():
            logits, cache = forward(None if token is None else token[:, None], cache)
        token = torch.where(finished, torch.full_like(finished, scorer.eos_id, dtype=torch.long), logits.argmax(-1))
        generated.append(token)
        finished |= torch.isin(token, ends)
        if _all_done(bool(finished.all())):
            break
    tokens = torch.stack(generated, dim=1).tolist()
    stops = set(ends.tolist())
    return [row[: next((i for i, t in enumerate(row) if t in stops), len(row))] for row in tokens]
