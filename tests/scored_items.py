"""A tiny untrained scorer and evaluation items whose exact-match score lies strictly between 0 and 1: what the
predictions and task-metric tests score (tests/outputs/test_predictions.py, tests/scoring/test_task_metrics.py)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.config.schema import EvalConfig
from cl_runner.scoring.evaluate import Scorer, score_task
from cl_runner.tasks.encode import EncodedTask, EvalItem

LABELS = ["[20]", "[21, 22]", "[23]"]


def tiny_scorer() -> Scorer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=1,
                                       eos_token_id=1)).eval()
    return Scorer(model=model, pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=nullcontext,
                  batch_size=4, cfg=EvalConfig(), decode=lambda ids: " ".join(map(str, ids)), examples=True)


def items(scorer: Scorer, n: int = 10) -> list[EvalItem]:
    """Prompts of several lengths; every other exact-match reference is the model's own answer (score in (0, 1))."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(2, 64, (1 + i * 5 % 9,), generator=gen).tolist()
        target = torch.randint(2, 64, (1 + i % 2,), generator=gen).tolist()
        out.append(EvalItem(prompt, target + [1], LABELS[i % 3] if i % 2 else " ".join(map(str, target))))
    own = score_task(scorer, EncodedTask("t", [], [], out, None), "exact_match", "\n", None, max_new_tokens=3)
    return [EvalItem(it.prompt_ids, it.target_ids, r["generated"] if i % 4 == 0 else it.target)
            for i, (it, r) in enumerate(zip(out, own["examples"], strict=True))]
