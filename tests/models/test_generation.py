"""Greedy generation (models/generation.py): batched by length with left padding, each row stopping at EOS or the
end-of-turn token and leaving the batch, gives exactly the one-by-one tokens, for both model kinds."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from tiny_lm import one_thread, tiny_model  # noqa: F401 (autouse fixture)
from tiny_t5 import tiny_t5

from cl_runner.config.schema import EvalConfig
from cl_runner.models.kinds import kind_of
from cl_runner.scoring.evaluate import Scorer, greedy_generate

BUDGET = 10


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(2, vocab, (1 + i * 5 % 11,), generator=gen).tolist() for i in range(12)]


@pytest.fixture(scope="module", params=["causal", "t5"])
def case(request) -> tuple[Scorer, list[list[int]], list[list[int]]]:
    """A tiny model's scorer whose EOS is the token it generates most (so rows end at different steps) and whose
    end-of-turn is the next most common one, prompts of 1 to 11 tokens, and each prompt's tokens generated alone."""
    model = tiny_model() if request.param == "causal" else tiny_t5()
    if request.param == "t5":  # its fresh init answers the pad token to every prompt: weights that vary more
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    rare = model.config.vocab_size - 1  # a real id the untrained model does not pick: the free run goes on
    scorer = Scorer(model=model, pad_id=0, eos_id=rare, device=torch.device("cpu"), autocast=nullcontext,
                    batch_size=16, cfg=EvalConfig(), decode=str, kind=kind_of(model))
    prompts = _prompts(min(model.config.vocab_size, 48))
    free = [greedy_generate(scorer, [p], BUDGET)[0] for p in prompts]
    (eos, _), (turn_end, _) = Counter(t for row in free for t in row).most_common(2)
    scorer = replace(scorer, eos_id=eos, stop_ids=(turn_end,))
    return scorer, prompts, [greedy_generate(scorer, [p], BUDGET)[0] for p in prompts]


def test_batched_generation_gives_the_one_by_one_tokens_with_rows_ending_at_different_steps(case):
    scorer, prompts, alone = case
    lengths = {len(row) for row in alone}
    assert len(lengths) >= 3 and min(lengths) < BUDGET  # early stops (EOS or end-of-turn) at several steps
    assert greedy_generate(scorer, prompts, BUDGET) == alone  # one batch, prompts of every length
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as scoring batches them: by length
    for start in range(0, len(order), 5):
        chunk = order[start : start + 5]
        assert greedy_generate(scorer, [prompts[i] for i in chunk], BUDGET) == [alone[i] for i in chunk]


def test_a_finished_row_leaves_the_batch(case):
    scorer, prompts, alone = case
    rows: list[int] = []
    hooked = scorer.model.get_decoder() if scorer.kind.name == "encoder-decoder" else scorer.model
    handle = hooked.register_forward_pre_hook(
        lambda m, a, kw: rows.append(next(v for v in (*a, *kw.values()) if torch.is_tensor(v)).shape[0]),
        with_kwargs=True)
    try:
        greedy_generate(scorer, prompts, BUDGET)
    finally:
        handle.remove()
    # forward k runs the rows still generating after k tokens (at least one while any is)
    still = [sum(len(row) >= k for row in alone) for k in range(len(rows))]
    assert rows[0] == len(prompts) and rows[1:] == still[1:]
    assert sum(rows) < len(prompts) * len(rows)  # fewer row-steps than the whole batch at every step
