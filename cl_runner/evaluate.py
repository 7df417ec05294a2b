"""Score one task: exact match (batched greedy generation), label accuracy (cached-prefix scoring), perplexity.

All scoring runs under ``torch.no_grad`` and the caller's autocast, in batches sorted by length so padding
stays small; a batch holds at most ``batch_size`` examples and, when ``batch_tokens`` is set, at most that many
padded tokens (its longest example's length x its size; generation counts its token budget too). Generation
uses left padding with explicit position ids, so it works for any causal LM.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from cl_runner.lm import collate, token_nll
from cl_runner.schema import EvalConfig
from cl_runner.tasks.encode import EncodedTask, EvalItem

_TRAILING = re.compile(r"[\s.,;:!?]+$")


@dataclass
class Scorer:
    """What scoring needs besides the items: the model, padding/EOS ids, device, autocast, batch limits."""

    model: torch.nn.Module
    pad_id: int
    eos_id: int
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    batch_size: int
    cfg: EvalConfig
    decode: Callable[[list[int]], str]
    batch_tokens: int | None = None  # padded tokens per batch (None: batch_size examples per batch)


def normalize_answer(text: str, stop: str, lowercase: bool = True, strip_punctuation: bool = True) -> str:
    """The exact-match rule: cut at the stop string, trim whitespace, optionally case and trailing punctuation."""
    if stop and stop in text:
        text = text[: text.index(stop)]
    text = " ".join(text.split())
    if strip_punctuation:
        text = _TRAILING.sub("", text).strip("\"'`")
    return text.lower() if lowercase else text


def _batches(scorer: Scorer, lengths: list[int]) -> list[list[int]]:
    """Indices in batches of similar length: at most ``batch_size`` examples and ``batch_tokens`` padded tokens
    (a single example longer than the token budget is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    budget = scorer.batch_tokens or math.inf
    batches: list[list[int]] = []
    for i in order:  # ascending lengths: the newest example is the batch's longest
        batch = batches[-1] if batches else None
        if batch is None or len(batch) == scorer.batch_size or (len(batch) + 1) * lengths[i] > budget:
            batches.append([i])
        else:
            batch.append(i)
    return batches


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - len(p) :] = torch.tensor(p)
        mask[row, length - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_generate(scorer: Scorer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt (left-padded batch, KV cache), stopping at EOS."""
    ids, mask = _left_pad(prompts, scorer.pad_id, scorer.device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=scorer.device)
    generated = []
    past = None
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        with scorer.autocast():
            out = scorer.model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past, use_cache=True
            )
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(finished, torch.full_like(token, scorer.eos_id), token)
        generated.append(token)
        finished |= token == scorer.eos_id
        if bool(finished.all()):
            break
        step_ids = token[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    tokens = torch.stack(generated, dim=1).tolist()
    return [row[: row.index(scorer.eos_id)] if scorer.eos_id in row else row for row in tokens]


def exact_match(scorer: Scorer, items: list[EvalItem], stop: str, max_new_tokens: int) -> dict:
    correct = blank = 0
    for batch in _batches(scorer, [len(it.prompt_ids) + max_new_tokens for it in items]):
        outputs = greedy_generate(scorer, [items[i].prompt_ids for i in batch], max_new_tokens)
        for i, tokens in zip(batch, outputs, strict=True):
            rule = {"stop": stop, "lowercase": scorer.cfg.lowercase, "strip_punctuation": scorer.cfg.strip_punctuation}
            prediction = normalize_answer(scorer.decode(tokens), **rule)
            if not prediction:
                blank += 1
            correct += prediction == normalize_answer(items[i].target, **rule)
    return {"score": correct / max(len(items), 1), "n": len(items), "blank": blank}


@torch.no_grad()
def label_logprobs(scorer: Scorer, prompts: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """(B, K) log-probability of each label continuation: the prompt runs once, labels reuse its KV cache."""
    ids, mask = _left_pad(prompts, scorer.pad_id, scorer.device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    batch, n_labels = len(prompts), len(labels)
    with scorer.autocast():
        out = scorer.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): each label's first token
    longest = max(len(label) for label in labels)
    label_ids = torch.full((n_labels, longest), scorer.pad_id, dtype=torch.long, device=scorer.device)
    label_mask = torch.zeros((n_labels, longest), dtype=torch.long, device=scorer.device)
    for k, label in enumerate(labels):
        label_ids[k, : len(label)] = torch.tensor(label)
        label_mask[k, : len(label)] = 1
    scores = first[:, label_ids[:, 0]]  # (B, K)
    if longest > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_labels)
        cont_ids = label_ids[:, :-1].repeat(batch, 1)  # tokens fed; each predicts the next label token
        cont_mask = torch.cat([mask.repeat_interleave(n_labels, 0), label_mask[:, :-1].repeat(batch, 1)], dim=1)
        start = positions[:, -1:].repeat_interleave(n_labels, 0) + 1
        cont_pos = start + torch.arange(longest - 1, device=scorer.device)
        with scorer.autocast():
            cont = scorer.model(
                input_ids=cont_ids, attention_mask=cont_mask, position_ids=cont_pos, past_key_values=cache
            )
        logp = torch.log_softmax(cont.logits.float(), dim=-1)
        nxt = label_ids[:, 1:].repeat(batch, 1)
        gathered = logp.gather(-1, nxt[..., None]).squeeze(-1) * label_mask[:, 1:].repeat(batch, 1)
        scores = scores + gathered.sum(-1).view(batch, n_labels)
    if scorer.cfg.length_normalize:
        scores = scores / label_mask.sum(-1).to(scores.dtype)
    return scores


def label_accuracy(scorer: Scorer, items: list[EvalItem], labels: list[list[int]], label_texts: list[str]) -> dict:
    correct = 0
    for batch in _batches(scorer, [len(it.prompt_ids) for it in items]):
        scores = label_logprobs(scorer, [items[i].prompt_ids for i in batch], labels)
        for i, choice in zip(batch, scores.argmax(-1).tolist(), strict=True):
            correct += label_texts[choice] == items[i].target
    return {"score": correct / max(len(items), 1), "n": len(items)}


@torch.no_grad()
def perplexity(scorer: Scorer, items: list[EvalItem]) -> dict:
    """exp of the mean NLL over all target tokens of the split (token-weighted)."""
    total_nll, total_tokens = 0.0, 0
    encoded = [
        {"input_ids": it.prompt_ids + it.target_ids, "labels": [-100] * len(it.prompt_ids) + it.target_ids,
         "task_id": 0}
        for it in items
    ]
    for batch in _batches(scorer, [len(e["input_ids"]) for e in encoded]):
        tensors = collate([encoded[i] for i in batch], scorer.pad_id, scorer.device)
        with scorer.autocast():
            logits = scorer.model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
        total_nll += float(token_nll(logits, tensors["labels"]).sum())
        total_tokens += int((tensors["labels"][:, 1:] != -100).sum())
    return {"score": math.exp(min(total_nll / max(total_tokens, 1), 50.0)), "n": len(items), "tokens": total_tokens}


def score_task(scorer: Scorer, task: EncodedTask, metric: str, stop: str, label_texts: list[str] | None,
               split: str = "test") -> dict:
    """Score ``split`` of one task with its metric; returns {"score": float, "n": int, ...}."""
    items = task.test if split == "test" else task.validation
    was_training = scorer.model.training
    scorer.model.eval()
    try:
        if metric == "perplexity":
            return perplexity(scorer, items)
        if metric == "label_accuracy":
            return label_accuracy(scorer, items, task.label_ids, label_texts)
        budget = scorer.cfg.max_new_tokens or max(len(it.target_ids) for it in items) + 2
        return exact_match(scorer, items, stop, budget)
    finally:
        scorer.model.train(was_training)
