"""Score one task: batched greedy generation scored by a generation metric (exact match, ROUGE-L, ...: the registry
of cl_runner/scoring/metrics.py), label accuracy (cached-prefix scoring), perplexity.

All scoring runs under ``torch.no_grad`` and the caller's autocast, in batches sorted by length so padding
stays small; a batch holds at most ``batch_size`` examples and, when ``batch_tokens`` is set, at most that many
padded tokens (its longest example's length x its size; generation counts its token budget too). Generation and
label scoring are the model kind's (``Scorer.kind``, models/kinds.py: a causal LM left-pads with explicit position
ids, an encoder-decoder runs its encoder once per prompt), over the KV cache of ``generation.cached_forward``.

Several processes (``cl_runner.core.dist``): the batches are planned over the whole split, exactly as one process plans
them, and rank r scores batches r, r + N, r + 2N, ... (strided: every rank gets short and long ones). Each
example's result (correct and blank, chosen label, NLL and target tokens) is computed in the same batch, with the
same padding, as in one process, so it is the same number; the results are gathered in example order and the
score is computed from all of them (perplexity sums the per-example NLLs with ``math.fsum``, exact in any order).
Under FSDP every forward is a collective, so every rank makes the same calls: a rank with fewer batches re-scores
the split's first batch and drops the result, and greedy generation steps until every rank's batch is done.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import torch

from cl_runner.config.schema import EvalConfig
from cl_runner.core.dist import all_gather_objects, world
from cl_runner.models.kinds import CAUSAL_LM, ModelKind
from cl_runner.models.lm import collate, token_nll
from cl_runner.scoring.answers import Reading
from cl_runner.scoring.metrics import LABELS, PERPLEXITY, Metric, metric_named
from cl_runner.tasks.encode import EncodedTask, EvalItem


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
    on_examples: Callable[[int], None] | None = None  # progress: examples scored by all ranks (rank 0's estimate)
    examples: bool = False  # also return each example's record under "examples", in example order (predictions.py)
    stop_ids: tuple[int, ...] = ()  # token ids besides EOS that end a generation (a chat template's end-of-turn)
    kind: ModelKind = CAUSAL_LM  # the model's kind (models/kinds.py): its generation, label scoring, batch layout


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


def rank_batches(n_batches: int, rank: int, size: int, same_calls: bool) -> list[int | None]:
    """The batches rank ``rank`` of ``size`` scores: every ``size``-th from ``rank`` on; with ``same_calls``
    (FSDP) padded with ``None`` (a dummy batch) so that every rank scores as many batches."""
    mine: list[int | None] = list(range(rank, n_batches, size))
    if same_calls:
        mine += [None] * (-(-n_batches // size) - len(mine))
    return mine


def gather_results(parts: list[dict[int, Any]], n: int) -> list[Any]:
    """The ranks' ``{example index: result}`` as one list in example order; each index exactly once."""
    merged = {i: result for part in parts for i, result in part.items()}
    if sum(len(part) for part in parts) != n or sorted(merged) != list(range(n)):
        raise RuntimeError(f"evaluation: the ranks scored {sorted(merged)[:8]}... of {n} examples, not each once")
    return [merged[i] for i in range(n)]


def per_example(scorer: Scorer, lengths: list[int], score_batch: Callable[[list[int], bool], list]) -> list:
    """One result per example, in example order: ``score_batch(indices, dummy)`` over this rank's batches of
    the split (all of them in one process), gathered from every rank."""
    where = world()
    batches = _batches(scorer, lengths)
    results: dict[int, Any] = {}
    for k in rank_batches(len(batches), where.rank, where.size, where.sharded):
        if k is None:  # FSDP: keep in step with the ranks that have a batch more
            score_batch(batches[0], True)
            continue
        results.update(zip(batches[k], score_batch(batches[k], False), strict=True))
        if scorer.on_examples is not None:  # this round of batches, all ranks together
            start = k - k % where.size
            scorer.on_examples(sum(len(b) for b in batches[start : start + where.size]))
    return gather_results(all_gather_objects(results), len(lengths))


def greedy_generate(scorer: Scorer, prompts: list[list[int]], max_new_tokens: int,
                    dummy: bool = False) -> list[list[int]]:
    """Greedy continuation of each prompt (batched, KV cache), stopping at EOS, as the model's kind does it
    (``ModelKind.greedy_generate``). ``dummy``: a batch that only keeps this rank in step with the others (FSDP)."""
    return scorer.kind.greedy_generate(scorer, prompts, max_new_tokens, dummy)


def score_generations(scorer: Scorer, items: list[EvalItem], metric: Metric, reading: Reading,
                      max_new_tokens: int) -> dict:
    """Greedy generation, then ``metric`` scores each text against its reference (read by ``reading``); each
    record is ``generated`` and the metric's fields. ``blank``: the examples whose answer is empty."""
    def score_batch(batch: list[int], dummy: bool) -> list[dict]:
        outputs = greedy_generate(scorer, [items[i].prompt_ids for i in batch], max_new_tokens, dummy)
        return [{"generated": text, **metric.score_example(reading, text, items[i].target, items[i].source)}
                for i, text in zip(batch, (scorer.decode(tokens) for tokens in outputs), strict=True)]

    results = per_example(scorer, [len(it.prompt_ids) + max_new_tokens for it in items], score_batch)
    blank = sum(not r["prediction"] for r in results)
    return _with_examples(scorer, {"score": metric.aggregate(results), "n": len(items), "blank": blank}, results)


def _with_examples(scorer: Scorer, result: dict, records: list[dict]) -> dict:
    """``result``, plus the per-example ``records`` under "examples" when ``scorer.examples`` asks for them."""
    return {**result, "examples": records} if scorer.examples else result


def label_logprobs(scorer: Scorer, prompts: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """(B, K) log-probability of each label after each prompt, as the model's kind scores it (causal: the prompt
    runs once and every label reuses its KV cache; ``ModelKind.label_logprobs``)."""
    return scorer.kind.label_logprobs(scorer, prompts, labels)


def label_accuracy(scorer: Scorer, items: list[EvalItem], labels: list[list[int]], label_texts: list[str]) -> dict:
    def score_batch(batch: list[int], dummy: bool) -> list[dict]:
        logprobs = label_logprobs(scorer, [items[i].prompt_ids for i in batch], labels).cpu()  # one transfer
        return [{"prediction": label_texts[choice], "label_scores": dict(zip(label_texts, row, strict=True)),
                 "correct": label_texts[choice] == items[i].target}
                for i, choice, row in zip(batch, logprobs.argmax(-1).tolist(), logprobs.tolist(), strict=True)]

    results = per_example(scorer, [len(it.prompt_ids) for it in items], score_batch)
    correct = sum(r["correct"] for r in results)
    return _with_examples(scorer, {"score": correct / max(len(items), 1), "n": len(items)}, results)


@torch.no_grad()
def perplexity(scorer: Scorer, items: list[EvalItem]) -> dict:
    """exp of the mean NLL over all target tokens of the split (token-weighted)."""
    encoded = [
        {"input_ids": it.prompt_ids + it.target_ids, "labels": [-100] * len(it.prompt_ids) + it.target_ids,
         "task_id": 0}
        for it in items
    ]

    def score_batch(batch: list[int], dummy: bool) -> list[dict]:
        tensors = scorer.kind.model_batch(collate([encoded[i] for i in batch], scorer.pad_id, scorer.device))
        with scorer.autocast():
            logits = scorer.model(**scorer.kind.model_inputs(tensors)).logits
        nll = token_nll(logits, tensors["labels"]).sum(-1).tolist()
        tokens = (tensors["labels"][:, 1:] != -100).sum(-1).tolist()
        return [{"nll": value, "tokens": count} for value, count in zip(nll, tokens, strict=True)]

    results = per_example(scorer, [len(e["input_ids"]) for e in encoded], score_batch)
    total_nll, total_tokens = math.fsum(r["nll"] for r in results), sum(r["tokens"] for r in results)
    score = math.exp(min(total_nll / max(total_tokens, 1), 50.0))
    return _with_examples(scorer, {"score": score, "n": len(items), "tokens": total_tokens}, results)


def score_task(scorer: Scorer, task: EncodedTask, metric: str, stop: str, label_texts: list[str] | None,
               split: str = "test", max_new_tokens: int | None = None, normalizer: str | None = None,
               answer_pattern: str | None = None) -> dict:
    """Score ``split`` of one task with its metric (a name in cl_runner/scoring/metrics.py's registry); returns
    {"score": float, "n": int, ...}, the score being the metric's aggregate of the per-example records. Generation
    budget: the task's ``max_new_tokens``, else ``eval.max_new_tokens``, else its longest target + 2. How answers
    are read (generation metrics): ``stop``, ``normalizer`` and ``answer_pattern`` (None: ``eval``'s)."""
    spec = metric_named(metric)
    items = task.test if split == "test" else task.validation
    # chat templates: generation stops at the end-of-turn; the metric's score is computed from the records
    kept = replace(scorer, stop_ids=tuple(task.stop_ids), examples=True)
    was_training = scorer.model.training
    scorer.model.eval()
    try:
        if spec.needs == PERPLEXITY:
            result = perplexity(kept, items)
        elif spec.needs == LABELS:
            result = label_accuracy(kept, items, task.label_ids, label_texts)
        else:
            reading = Reading(stop, answer_pattern if answer_pattern is not None else scorer.cfg.answer_pattern,
                              normalizer or scorer.cfg.normalizer, scorer.cfg.lowercase, scorer.cfg.strip_punctuation)
            budget = (max_new_tokens or scorer.cfg.max_new_tokens
                      or max(len(it.target_ids) for it in items) + 2)  # all ranks: the same
            result = score_generations(kept, items, spec, reading, budget)
    finally:
        scorer.model.train(was_training)
    records = result.pop("examples")
    result["score"] = spec.aggregate(records)
    return _with_examples(scorer, result, records)
