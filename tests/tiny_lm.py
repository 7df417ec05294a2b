"""A tiny GPT-2, synthetic token-level tasks and a Context around them, for strategy unit tests (no config, no
tokenizer); ``train`` runs the real one-task loop on them."""

from __future__ import annotations

import random
from contextlib import nullcontext
from functools import partial

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.config.schema import TrainConfig
from cl_runner.engine.loop import TaskRun, train_task
from cl_runner.models.lm import IGNORE_INDEX, Encoded, collate
from cl_runner.strategies.base import Context, Strategy

EOS, CUE = 0, [5, 6]  # every prompt ends with the cue; every answer ends with EOS
VOCAB = 48


def tiny_model(seed: int = 0, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def task_examples(task: int, n: int = 8) -> list[Encoded]:
    """``[relation, subject] + CUE -> [answer]``: the subjects are shared, the answers task-specific."""
    rng = random.Random(task)
    out = []
    for subject in range(n):
        prompt, answer = [7 + task, 10 + subject, *CUE], [30 + rng.randrange(12)]
        out.append({"input_ids": prompt + answer + [EOS], "labels": [IGNORE_INDEX] * len(prompt) + answer + [EOS],
                    "task_id": task})
    return out


def tiny_context(model: torch.nn.Module, tasks: int = 3, n: int = 8) -> Context:
    return Context(model=model, device=torch.device("cpu"), autocast=nullcontext,
                   collate=partial(collate, pad_id=EOS, device="cpu"), task_names=[f"t{i}" for i in range(tasks)],
                   train_sets=[task_examples(t, n) for t in range(tasks)], batch_size=4, seed=0, eos_id=EOS,
                   decode=lambda ids: " ".join(map(str, ids)))


def train(ctx: Context, strategy: Strategy, task: int, epochs: int = 2, lr: float = 1e-2) -> None:
    """Task ``task`` through the real loop (every hook in order), no validation."""
    ctx.task_index = task
    cfg = TrainConfig(epochs=epochs, batch_size=4, lr=lr, warmup_ratio=0.0, keep_best=False)
    train_task(TaskRun(ctx, strategy, ctx.train_sets[task], cfg, validate=lambda tasks: 0.0))


def logits(model: torch.nn.Module, ids: list[int] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids or [7, 10, *CUE, 30]])).logits


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds waiting (1000x slower ops on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
