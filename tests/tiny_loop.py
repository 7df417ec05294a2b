"""A one-layer GPT-2 without dropout, random prompt/target examples (no task structure: token 1 ends each target)
and a one-task Context around them, for tests of the loop and the batch layout that compare exactly. The strategy
unit tests' model, with task-structured examples, is tests/tiny_lm.py's."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.models.lm import Encoded, collate
from cl_runner.strategies.base import Context


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=40, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: exact comparisons
    return GPT2LMHeadModel(config)


def examples(n: int = 16) -> list[Encoded]:
    """``n`` examples of 2-5 prompt and 1-3 target tokens plus the end token 1, the same ones on every call."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        target = torch.randint(3, 40, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist() + [1]
        out.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target, "task_id": 0})
    return out


def context(model: torch.nn.Module, data: list[Encoded]) -> Context:
    """A Context of one task, ``a``, training on ``data`` on the CPU."""
    return Context(model=model, device=torch.device("cpu"), autocast=nullcontext,
                   collate=partial(collate, pad_id=0), task_names=["a"], train_sets=[data])
