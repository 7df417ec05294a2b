"""Scoring: cached label scoring equals brute force, batched left-padded generation equals one-by-one,
exact-match normalisation, and the prompt-cutting rule."""

from contextlib import nullcontext

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.evaluate import Scorer, greedy_generate, label_logprobs, normalize_answer
from cl_runner.models import train_tokenizer
from cl_runner.schema import EvalConfig
from cl_runner.tasks.base import Example, Task
from cl_runner.tasks.encode import encode_task


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).eval()
    return Scorer(model=model, pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=nullcontext,
                  batch_size=8, cfg=EvalConfig(), decode=str)


def brute_force_logprob(model, prompt, label):
    ids = torch.tensor([prompt + label])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(label))


def test_cached_label_scores_equal_brute_force(scorer):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    labels = [[20], [21, 22, 23], [24, 25]]
    cached = label_logprobs(scorer, prompts, labels)
    for b, prompt in enumerate(prompts):
        for k, label in enumerate(labels):
            assert float(cached[b, k]) == pytest.approx(brute_force_logprob(scorer.model, prompt, label), abs=1e-4)


def test_length_normalised_scores_divide_by_label_length(scorer):
    prompts, labels = [[5, 6, 7]], [[20], [21, 22, 23]]
    plain = label_logprobs(scorer, prompts, labels)
    normed = label_logprobs(Scorer(**{**scorer.__dict__, "cfg": EvalConfig(length_normalize=True)}), prompts, labels)
    assert torch.allclose(normed, plain / torch.tensor([1.0, 3.0]), atol=1e-5)


def test_batched_left_padded_generation_equals_one_by_one(scorer):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    batched = greedy_generate(scorer, prompts, max_new_tokens=5)
    for prompt, out in zip(prompts, batched, strict=True):
        assert out == greedy_generate(scorer, [prompt], max_new_tokens=5)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" Paris.", "paris"), ("paris\nmore text", "paris"), ('  "Red"!  ', "red"), ("", ""), ("new   york", "new york")],
)
def test_exact_match_normalisation(text, expected):
    assert normalize_answer(text, stop="\n") == expected


def test_case_kept_when_lowercase_is_off():
    assert normalize_answer("Paris", stop="\n", lowercase=False) == "Paris"


def test_long_prompts_are_cut_in_the_middle_never_the_target():
    tok = train_tokenizer(["alpha beta gamma delta " * 50, "answer"], vocab_size=300)
    prompt = "INSTRUCTION " + "filler " * 200 + "CUE:"
    task = Task(name="t", metric="exact_match", train=[Example(prompt, " answer")], validation=[], test=[])
    enc = encode_task(task, 0, tok, max_length=32)
    ex = enc.train[0]
    assert len(ex["input_ids"]) == 32
    target = tok(" answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"][-len(target):] == target
    assert [t for t in ex["labels"] if t != -100] == target
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    kept = ex["input_ids"][: 32 - len(target)]
    assert kept[:3] == prompt_ids[:3] and kept[-2:] == prompt_ids[-2:]  # head and answer cue kept
    assert enc.cut["train"] == 1
