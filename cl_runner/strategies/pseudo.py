"""LAMOL's pieces as plain functions: the generation-token batch, top-k sampling after a generation token,
and parsing a sampled token sequence back into an encoded (prompt, answer) example of its task.

Token-level format: a task's real example is ``prompt + answer + [EOS]`` (prompt masked from the QA loss);
its generation version is ``[GEN_t] + prompt + answer + [EOS]`` with every token after ``GEN_t`` a target. A
sample is split at the task's *answer cue*: the token suffix all its training prompts share (the template's
``\\nAnswer:`` for instance). A chat-templated task ends its examples with the template's end-of-turn token instead
of EOS (``end_token``), and its prompts hold that token too (the user's turn ends with it), so its samples end at
the first end-of-turn after the cue (``after_cue``: the cue of a chat template is its generation prompt).
"""

from __future__ import annotations

import torch

from cl_runner.core.dist import broadcast_object, world
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import IGNORE_INDEX, Encoded
from cl_runner.strategies.base import Context
from cl_runner.strategies.common import evaluating


def prompt_of(example: Encoded) -> list[int]:
    return [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label == IGNORE_INDEX]


def end_token(examples: list[Encoded], eos_id: int) -> int:
    """The token every example ends with (EOS, or a chat template's end-of-turn); EOS when they differ."""
    ends = {e["input_ids"][-1] for e in examples}
    return ends.pop() if len(ends) == 1 else eos_id


def after_cue(examples: list[Encoded], end_id: int, cue: list[int]) -> list[int] | None:
    """``cue`` when the prompts hold the end token themselves (a chat template's turns; position 0 aside, where an
    empty prompt's start token may be EOS), so that a sample may only end after its cue; else None."""
    return cue if any(end_id in prompt_of(e)[1:] for e in examples) else None


def _end_of(row: list[int], end_id: int, min_tokens: int, after: list[int] | None) -> int | None:
    """Where a sampled row ends: its first end token at or after ``min_tokens`` (and after ``after``, when given)."""
    start = min_tokens
    if after:
        at = next((i for i in range(len(row) - len(after) + 1) if row[i : i + len(after)] == after), None)
        if at is None:
            return None
        start = max(start, at + len(after))
    return next((i for i in range(start, len(row)) if row[i] == end_id), None)


def answer_cue(examples: list[Encoded]) -> list[int]:
    """The longest token suffix shared by the prompts of ``examples`` (empty when they share none)."""
    prompts = [prompt_of(e) for e in examples]
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest and all(p[-1 - n] == prompts[0][-1 - n] for p in prompts):
        n += 1
    return prompts[0][len(prompts[0]) - n :]


def generation_batch(batch: dict[str, torch.Tensor], gen_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The generation version of a collated batch: ``GEN_{task}`` prepended, every real token a target."""
    prefix = gen_ids[batch["task_ids"]][:, None]
    mask = batch["attention_mask"]
    ids = torch.cat([prefix, batch["input_ids"]], dim=1)
    labels = torch.cat([torch.full_like(prefix, IGNORE_INDEX),
                        batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.cat([torch.ones_like(prefix), mask], dim=1), "labels": labels}


@no_grad
def sample_after(ctx: Context, gen_id: int, n: int, max_tokens: int, eos_id: int, min_tokens: int, top_k: int,
                 temperature: float, generator: torch.Generator, batch_size: int,
                 after: list[int] | None = None) -> list[list[int]]:
    """``n`` sequences sampled after the token ``gen_id`` with top-k sampling (``generator``: CPU, seeded).

    A row ends at the first EOS (``eos_id``: the task's end token) at or after position ``min_tokens`` (an EOS
    earlier than that can be a prompt's own start token) and, with ``after``, after the first occurrence of those
    tokens (``after_cue``), or after ``max_tokens`` tokens; the EOS is kept, so a row without one ran out.
    Several processes: every rank samples the same rows (the same seeded draws), and each step's tokens are rank
    0's, broadcast, so the ranks feed the model the same inputs and stop together even where their logits differ
    in the last bits (GPU kernels): the same forward calls on every rank, as FSDP needs.
    """
    from cl_runner.models.generation import (
        cached_forward,  # the transformers Cache API, as evaluation's generation uses it
    )

    rows: list[list[int]] = []
    with evaluating(ctx.model):
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            step_ids = torch.full((size, 1), gen_id, dtype=torch.long, device=ctx.device)
            past, tokens = None, []
            done = torch.zeros(size, dtype=torch.bool)
            cued = torch.zeros(size, dtype=torch.bool) if after else torch.ones(size, dtype=torch.bool)
            mask = torch.ones((size, 1), dtype=torch.long, device=ctx.device)  # no padding: all rows start alike
            for position in range(max_tokens):
                with ctx.autocast():
                    out, past = cached_forward(ctx.model, past, input_ids=step_ids, attention_mask=mask)
                values, index = out.logits[:, -1].float().topk(min(top_k, out.logits.shape[-1]), dim=-1)
                probs = torch.softmax(values / temperature, dim=-1).cpu()
                pick = torch.multinomial(probs, 1, generator=generator)  # on the CPU: seeded on any device
                token = index.gather(1, pick.to(index.device))
                if world().distributed:
                    token = broadcast_object(token.cpu()).to(index.device)
                tokens.append(token.squeeze(1).cpu())
                if position >= min_tokens:
                    done |= (tokens[-1] == eos_id) & cued
                if after and len(tokens) >= len(after):  # the cue just completed: an end token may follow
                    cued |= (torch.stack(tokens[-len(after):], dim=1) == torch.tensor(after)).all(1)
                if bool(done.all()):
                    break
                step_ids, mask = token, torch.cat([mask, mask[:, :1]], dim=1)
            for row in torch.stack(tokens, dim=1).tolist():
                end = _end_of(row, eos_id, min_tokens, after)
                rows.append(row if end is None else row[: end + 1])
    return rows


def parse_sample(tokens: list[int], cue: list[int], eos_id: int, min_prompt: int, task_id: int
                 ) -> tuple[Encoded | None, str]:
    """An encoded example (prompt through the cue masked, answer + EOS as targets) or None, and why:
    ``kept`` | ``no_end`` (no EOS) | ``no_cue`` | ``empty_prompt`` | ``empty_answer`` | ``eos_inside``."""
    if not tokens or tokens[-1] != eos_id:
        return None, "no_end"
    for i in range(len(tokens) - len(cue)):
        if tokens[i : i + len(cue)] == cue:
            prompt, answer = tokens[: i + len(cue)], tokens[i + len(cue) : -1]
            break
    else:
        return None, "no_cue"
    if len(prompt) < min_prompt:
        return None, "empty_prompt"
    if not answer:
        return None, "empty_answer"
    if eos_id in answer:
        return None, "eos_inside"
    example: Encoded = {"input_ids": prompt + answer + [eos_id],
                        "labels": [IGNORE_INDEX] * len(prompt) + answer + [eos_id], "task_id": task_id}
    return example, "kept"
