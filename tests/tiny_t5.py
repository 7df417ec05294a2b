"""The tiny T5 of conf/model/tiny_t5.yaml (dropout off) and a Context around it on tiny_lm's token-level tasks, its
kind chosen by ``kind_of`` as the run chooses it, for tests of strategies on an encoder-decoder; Hugging Face's own
decoder outputs of one example, fed as T5 reads it (prompt + EOS to the encoder, ``[start] + target`` to the
decoder, no padding), a reference that shares nothing with the kind's batch layout; and a perplexity through the
kind's scoring."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any

import torch
from helpers import make_config
from tiny_lm import EOS, tiny_context

from cl_runner.config.schema import EvalConfig, ModelConfig
from cl_runner.models.kinds import EncoderDecoder, kind_of
from cl_runner.models.lm import IGNORE_INDEX, Encoded, target_count
from cl_runner.models.load import load_model, train_tokenizer
from cl_runner.scoring.evaluate import Scorer, perplexity
from cl_runner.strategies.base import Context
from cl_runner.tasks.encode import EvalItem


@functools.cache
def _parts() -> tuple[ModelConfig, Any]:
    tokenizer = train_tokenizer(["the capital of france is paris", "colour of the sky: blue"], 300)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == EOS  # the EOS tiny_lm's examples end with
    return make_config("model=tiny_t5", "+model.arch.dropout_rate=0.0").model, tokenizer


def tiny_t5(seed: int = 0) -> torch.nn.Module:
    """conf/model/tiny_t5.yaml's T5 (a vocabulary of ~270 tokens: tiny_lm's ids are all in it), eval mode."""
    cfg, tokenizer = _parts()
    model = load_model(cfg, tokenizer, seed)
    assert isinstance(kind_of(model), EncoderDecoder)
    return model.eval()


def t5_context(model: torch.nn.Module, tasks: int = 3, n: int = 8) -> Context:
    """tiny_lm's context (``tasks`` tasks of ``n`` examples) with the model's kind, as the run builds it; every
    second prompt a token shorter and every third target a token longer, so batches pad both encoder and decoder."""
    ctx = tiny_context(model, tasks, n)
    ctx.kind = kind_of(model)
    ctx.train_sets = [[ragged(e, i) for i, e in enumerate(examples)] for examples in ctx.train_sets]
    return ctx


def ragged(example: Encoded, i: int) -> Encoded:
    prompt, target = split(example)
    prompt = prompt[i % 2 :]
    target = [target[0], 20 + i % 8, *target[1:]] if i % 3 == 0 else target
    return {**example, "input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def split(example: Encoded) -> tuple[list[int], list[int]]:
    """(prompt, target) of an encoded example."""
    cut = len(example["input_ids"]) - target_count(example)
    return example["input_ids"][:cut], example["input_ids"][cut:]


def hf_outputs(model: torch.nn.Module, example: Encoded, **options: Any) -> Any:
    """The model's outputs on ``example`` alone: encoder ``prompt + [EOS]``, decoder ``[start] + target``."""
    prompt, target = split(example)
    return model(input_ids=torch.tensor([prompt + [EOS]]),
                 decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id, *target]]), **options)


def hf_target_logits(model: torch.nn.Module, example: Encoded) -> torch.Tensor:
    """(T, V): the decoder's logits predicting each of the example's T target tokens."""
    return hf_outputs(model, example).logits[0, :-1]


def hf_mean_nll(model: torch.nn.Module, example: Encoded) -> torch.Tensor:
    """The example's mean target-token NLL by Hugging Face's own loss (``labels``)."""
    prompt, target = split(example)
    return model(input_ids=torch.tensor([prompt + [EOS]]), labels=torch.tensor([target])).loss


def task_perplexity(ctx: Context, task: int) -> float:
    """Perplexity of task ``task``'s training targets, scored as the run scores (``Scorer`` with ``ctx.kind``)."""
    scorer = Scorer(model=ctx.model, pad_id=EOS, eos_id=EOS, device=ctx.device, autocast=nullcontext, batch_size=8,
                    cfg=EvalConfig(), decode=ctx.decode, kind=ctx.kind)
    items = [EvalItem(prompt_ids=split(e)[0], target_ids=split(e)[1], target="") for e in ctx.train_sets[task]]
    return perplexity(scorer, items)["score"]
