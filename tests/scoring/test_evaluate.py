"""Scoring: cached label scoring equals brute force, batched left-padded generation equals one-by-one,
exact-match normalisation, the prompt-cutting rule, and token-sized batches scoring as example-count ones."""

from contextlib import nullcontext

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.config.schema import EvalConfig
from cl_runner.models.load import train_tokenizer
from cl_runner.scoring.answers import normalize_answer
from cl_runner.scoring.evaluate import Scorer, _batches, greedy_generate, label_logprobs, score_task
from cl_runner.tasks.base import Example, Task
from cl_runner.tasks.encode import EncodedTask, EvalItem, encode_task


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


def _items(n: int, seed: int = 1) -> list[EvalItem]:
    """Prompts of 1..13 tokens and targets of 1..3 tokens (+ EOS), ids in the fixture model's vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        prompt = torch.randint(2, 64, (1 + i * 7 % 13,), generator=gen).tolist()
        target = torch.randint(2, 64, (1 + i % 3,), generator=gen).tolist()
        items.append(EvalItem(prompt_ids=prompt, target_ids=target + [1], target=str(target)))
    return items


def test_token_budget_batches_hold_similar_lengths_within_both_limits():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8]
    scorer = Scorer(model=None, pad_id=0, eos_id=1, device=None, autocast=nullcontext, batch_size=3,
                    cfg=EvalConfig(), decode=str, batch_tokens=10)
    # sorted: 1 2 3 3 5 7 8 9 -> [1 2 3] (3 examples x 3 = 9 tokens), [3 5] (2 x 5 = 10), then one each: 7 8 9
    assert [[lengths[i] for i in b] for b in _batches(scorer, lengths)] == [[1, 2, 3], [3, 5], [7], [8], [9]]
    by_count = Scorer(**{**scorer.__dict__, "batch_tokens": None})
    assert [[lengths[i] for i in b] for b in _batches(by_count, lengths)] == [[1, 2, 3], [3, 5, 7], [8, 9]]


@pytest.mark.parametrize("metric", ["exact_match", "label_accuracy", "perplexity"])
def test_token_sized_batches_score_exactly_as_example_count_batches(scorer, metric):
    items = _items(24)
    # half the exact-match references are the model's own answers, so the score is neither 0 nor 1
    own = [greedy_generate(scorer, [it.prompt_ids], max_new_tokens=6)[0] for it in items]  # 6: longest target + 2
    items = [EvalItem(it.prompt_ids, it.target_ids, str(o) if i % 2 else it.target)
             for i, (it, o) in enumerate(zip(items, own, strict=True))]
    task = EncodedTask(name="t", train=[], validation=[], test=items, label_ids=[[20], [21, 22], [23]])
    labels = ["[20]", "[21, 22]", "[23]"]
    by_count = score_task(Scorer(**{**scorer.__dict__, "batch_tokens": None}), task, metric, "\n", labels)
    by_tokens = score_task(Scorer(**{**scorer.__dict__, "batch_tokens": 24}), task, metric, "\n", labels)
    assert len(_batches(Scorer(**{**scorer.__dict__, "batch_tokens": 24}), [len(i.prompt_ids) for i in items])) > 3
    if metric == "exact_match":
        assert 0 < by_count["score"] < 1
    assert by_tokens == pytest.approx(by_count, rel=1e-6)
