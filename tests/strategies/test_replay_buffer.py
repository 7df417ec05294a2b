"""Replay buffer: reservoir uniformity, per-task balance, importance weights, replay mixing, exact resume; the
loss-based samplings on an encoder-decoder (tiny_t5)."""

from __future__ import annotations

import contextlib
import functools
import io
import math

import pytest
import torch
from tiny_lm import one_thread, tiny_model, train  # noqa: F401 (autouse fixture)
from tiny_t5 import hf_mean_nll, t5_context, task_perplexity, tiny_t5

from cl_runner.models.lm import causal_lm_loss, collate
from cl_runner.strategies.base import Context
from cl_runner.strategies.buffer import (
    CANDIDATES_PER_SLOT,
    ReplayBuffer,
    example_losses,
    importance_weights,
    task_quotas,
)
from cl_runner.strategies.replay import Replay, ReplayConfig


def make_task(task: int, n: int, vocab: int | None = None) -> list[dict]:
    """n encoded examples of varying length. Without ``vocab``, input_ids[0] = task * 1000 + index (an id to
    track examples by); with it, every token is below ``vocab`` so a model can read them."""
    g = torch.Generator().manual_seed(task)
    out = []
    for i in range(n):
        length = 4 + int(torch.randint(0, 8, (1,), generator=g))
        ids = torch.randint(1, vocab or 50, (length,), generator=g).tolist()
        if vocab is None:
            ids[0] = task * 1000 + i
        prompt = length // 2
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "task_id": task})
    return out


def make_ctx(model=None, train_sets=None, batch_size: int = 8, seed: int = 0) -> Context:
    return Context(model=model if model is not None else torch.nn.Linear(1, 1), device=torch.device("cpu"),
                   autocast=contextlib.nullcontext, collate=functools.partial(collate, pad_id=0),
                   task_names=[f"t{i}" for i in range(len(train_sets or []))], train_sets=train_sets or [],
                   batch_size=batch_size, seed=seed)


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_reservoir_is_uniform_over_everything_seen():
    sizes, capacity, reps = [15, 25, 40], 10, 600
    tasks = [make_task(t, n) for t, n in enumerate(sizes)]
    total = sum(sizes)
    counts = torch.zeros(total)
    shares = set()
    for rep in range(reps):
        buffer = ReplayBuffer(capacity, "reservoir")
        for t, examples in enumerate(tasks):
            buffer.add_task(t, examples, torch.Generator().manual_seed(rep * 10 + t))
        assert len(buffer) == capacity and buffer.state_dict()["seen_total"] == total
        shares.add(tuple(buffer.counts().get(t, 0) for t in range(3)))
        for e in buffer.examples:
            task, i = divmod(e["input_ids"][0], 1000)
            counts[sum(sizes[:task]) + i] += 1
    expected = torch.full((total,), reps * capacity / total)
    # 79 degrees of freedom: the 0.999 quantile is about 124; a bias towards recent or early tasks blows it up
    assert chi_square(counts, expected) < 124
    bounds = [sum(sizes[:t]) for t in range(4)]
    per_task = [float(counts[bounds[t] : bounds[t + 1]].sum()) / (reps * capacity) for t in range(3)]
    assert per_task == pytest.approx([n / total for n in sizes], abs=0.02)
    assert len(shares) > 10  # one reservoir over the stream: the task shares are random, not fixed quotas


@pytest.mark.parametrize("sampling", ["reservoir", "random"])
def test_per_task_shares_are_uniform_within_each_task(sampling):
    sizes, capacity, reps = [12, 30, 18], 9, 600  # final shares 3/3/3, after shrinking from 9 and 5
    tasks = [make_task(t, n) for t, n in enumerate(sizes)]
    counts = [torch.zeros(n) for n in sizes]
    for rep in range(reps):
        buffer = ReplayBuffer(capacity, sampling, per_task=True)
        for t, examples in enumerate(tasks):
            buffer.add_task(t, examples, torch.Generator().manual_seed(rep * 10 + t))
        assert buffer.counts() == {0: 3, 1: 3, 2: 3}
        for e in buffer.examples:
            task, i = divmod(e["input_ids"][0], 1000)
            counts[task][i] += 1
    stat = sum(chi_square(c, torch.full_like(c, reps * 3 / len(c))) for c in counts)
    assert stat < 96  # 57 degrees of freedom, 0.999 quantile about 95.7


@pytest.mark.parametrize("sampling", ["reservoir", "random", "importance", "hardest"])
@pytest.mark.parametrize("per_task", [False, True])
def test_size_never_exceeds_buffer_size(sampling, per_task):
    buffer = ReplayBuffer(12, sampling, per_task)
    seen = 0
    for t, n in enumerate([5, 30, 2, 17, 40]):
        examples = make_task(t, n)
        buffer.add_task(t, examples, torch.Generator().manual_seed(t), score=lambda ex: torch.rand(len(ex)))
        seen += n
        assert len(buffer) <= 12
        assert len(buffer) == min(12, seen)
        assert all(isinstance(x, int) for e in buffer.examples for x in e["input_ids"])


def test_per_task_balancing_shrinks_old_shares():
    buffer = ReplayBuffer(12, "random", per_task=True)
    history = []
    for t, n in enumerate([100, 3, 100, 100]):
        buffer.add_task(t, make_task(t, n), torch.Generator().manual_seed(t))
        history.append(buffer.counts())
        assert sum(buffer.counts().values()) == 12
    # task 1 has 3 examples only: the rest of its share goes to the others (earlier tasks first on ties)
    assert history == [{0: 12}, {0: 9, 1: 3}, {0: 5, 1: 3, 2: 4}, {0: 3, 1: 3, 2: 3, 3: 3}]
    assert task_quotas({0: 100, 1: 100, 2: 100}, 10, equal=True) == {0: 4, 1: 3, 2: 3}
    assert task_quotas({0: 30, 1: 10}, 8, equal=False) == {0: 6, 1: 2}


def test_shrinking_keeps_a_subset_and_hardest_keeps_highest_loss():
    buffer = ReplayBuffer(6, "hardest", per_task=True)
    losses = {0: torch.arange(20.0), 1: torch.arange(20.0)}
    first = make_task(0, 20)
    buffer.add_task(0, first, torch.Generator().manual_seed(0),
                    score=lambda ex: losses[0][[e["input_ids"][0] for e in ex]])
    kept0 = sorted(e["input_ids"][0] for e in buffer.examples)
    assert kept0 == list(range(14, 20))  # the 6 highest losses of the pool (8 x 6 candidates >= 20: all)
    buffer.add_task(1, make_task(1, 20), torch.Generator().manual_seed(1),
                    score=lambda ex: losses[1][[e["input_ids"][0] - 1000 for e in ex]])
    assert sorted(e["input_ids"][0] for e in buffer.examples if e["task_id"] == 0) == [17, 18, 19]
    assert sorted(e["input_ids"][0] - 1000 for e in buffer.examples if e["task_id"] == 1) == [17, 18, 19]


def test_task_quotas_give_leftover_slots_by_largest_remainder_then_task_order():
    # exact shares 0.7, 2.1, 4.2: the one slot left after flooring goes to the largest remainder (task 0)
    assert task_quotas({0: 10, 1: 30, 2: 60}, 7, equal=False) == {0: 1, 1: 2, 2: 4}
    assert task_quotas({0: 20, 1: 80}, 6, equal=False) == {0: 1, 1: 5}  # 1.2, 4.8: the larger task's remainder
    # shares 1.61, 2.58, 0.81: two slots left, to the largest remainders (task 2, then task 0)
    assert task_quotas({0: 20, 1: 32, 2: 10}, 5, equal=False) == {0: 2, 1: 2, 2: 1}
    assert task_quotas({0: 5, 1: 5, 2: 5, 3: 5}, 6, equal=True) == {0: 2, 1: 2, 2: 1, 3: 1}  # ties: earlier
    # tasks smaller than their share keep everything; what they leave is shared again, round after round
    assert task_quotas({0: 1, 1: 2, 2: 100, 3: 100}, 15, equal=True) == {0: 1, 1: 2, 2: 6, 3: 6}
    assert task_quotas({0: 1, 1: 3, 2: 100}, 12, equal=True) == {0: 1, 1: 3, 2: 8}
    assert task_quotas({0: 2, 1: 100}, 3, equal=True) == {0: 2, 1: 1}  # the last slot, given back by task 0
    assert task_quotas({0: 5, 1: 5}, 1, equal=True) == {0: 1, 1: 0}
    assert task_quotas({0: 3, 1: 4}, 10, equal=False) == {0: 3, 1: 4}  # room for everything
    assert task_quotas({0: 0, 1: 5, 2: 1}, 3, equal=True) == {0: 0, 1: 2, 2: 1}  # a task with nothing seen
    assert task_quotas({}, 3, equal=True) == {}


def test_hardest_shrink_drops_the_lowest_losses_wherever_they_sit():
    buffer = ReplayBuffer(4, "hardest", per_task=True)
    losses = torch.tensor([3.0, 9.0, 1.0, 7.0])  # kept in descending order: 9, 7, 3, 1
    buffer.add_task(0, make_task(0, 4), torch.Generator().manual_seed(0),
                    score=lambda ex: losses[[e["input_ids"][0] for e in ex]])
    state = buffer.state_dict()  # the slots in another order (as a resumed or reservoir-filled buffer may hold)
    for key in ("examples", "tasks", "scores"):
        state[key] = [state[key][i] for i in (2, 0, 3, 1)]  # losses by slot: 3, 9, 1, 7
    buffer.load_state_dict(state)
    buffer.add_task(1, make_task(1, 10), torch.Generator().manual_seed(1), score=lambda ex: torch.zeros(len(ex)))
    # task 0 shrinks from 4 to 2: its two highest losses stay, in their slot order
    assert [e["input_ids"][0] for e in buffer.examples if e["task_id"] == 0] == [1, 3]
    assert [s for s, t in zip(buffer.scores, buffer.tasks, strict=True) if t == 0] == [9.0, 7.0]
    assert buffer.counts() == {0: 2, 1: 2}


def test_sample_draws_with_replacement_only_when_asked_for_more_than_it_holds():
    buffer = ReplayBuffer(5, "random")
    buffer.add_task(0, make_task(0, 5), torch.Generator().manual_seed(0))

    def ids(examples):
        return [e["input_ids"][0] for e in examples]

    for seed in range(20):  # n <= len: without replacement
        assert sorted(ids(buffer.sample(5, torch.Generator().manual_seed(seed)))) == [0, 1, 2, 3, 4]
        assert len(set(ids(buffer.sample(3, torch.Generator().manual_seed(seed))))) == 3
    draws = ids(buffer.sample(6, torch.Generator().manual_seed(0)))
    assert len(draws) == 6 and set(draws) <= {0, 1, 2, 3, 4}
    counts = torch.bincount(torch.tensor(ids(buffer.sample(5000, torch.Generator().manual_seed(1)))),
                            minlength=5).float()
    assert chi_square(counts, torch.full((5,), 1000.0)) < 18.5  # uniform with replacement: 4 dof, 0.999 quantile
    assert buffer.sample(0, torch.Generator()) == [] and ReplayBuffer(5).sample(3, torch.Generator()) == []


@pytest.mark.parametrize("sampling", ["importance", "hardest"])
def test_scored_modes_draw_a_uniform_pool_of_candidates_per_slot_and_keep_distinct_examples(sampling):
    examples, scored = make_task(0, 50), []

    def score(ex):  # loss = the example's index; records which candidates were scored
        scored.append([e["input_ids"][0] for e in ex])
        return torch.tensor([float(i) for i in scored[-1]])

    buffer = ReplayBuffer(3, sampling)
    buffer.add_task(0, examples, torch.Generator().manual_seed(0), score=score)
    (pool,) = scored
    assert len(pool) == len(set(pool)) == CANDIDATES_PER_SLOT * 3 < 50  # a pool, not the whole task
    kept = [e["input_ids"][0] for e in buffer.examples]
    assert len(set(kept)) == 3 and set(kept) <= set(pool)
    assert buffer.scores == [float(i) for i in kept]
    if sampling == "hardest":
        assert sorted(kept) == sorted(pool)[-3:]
    for seed in range(5):  # the whole pool (a task of 4 in 4 slots): every example once, none twice
        small = ReplayBuffer(4, sampling)
        small.add_task(0, make_task(0, 4), torch.Generator().manual_seed(seed), score=lambda ex: torch.arange(4.0))
        assert sorted(e["input_ids"][0] for e in small.examples) == [0, 1, 2, 3]


@pytest.mark.parametrize("sampling", ["random", "importance", "hardest"])
def test_a_task_left_without_a_slot_adds_nothing(sampling):
    buffer = ReplayBuffer(2, sampling, per_task=True)
    for t in range(3):  # equal shares of 2 slots among 3 tasks: 1, 1, 0
        buffer.add_task(t, make_task(t, 5), torch.Generator().manual_seed(t), score=lambda ex: torch.rand(len(ex)))
    assert buffer.counts() == {0: 1, 1: 1}


def test_example_loss_of_a_single_target_token_is_its_nll():
    model = tiny_model(vocab=50)
    example = {"input_ids": [3, 4, 5, 6], "labels": [-100, -100, -100, 6], "task_id": 0}
    (loss,) = example_losses(make_ctx(model, [[example]]), [example])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits[0, 2], -1)
    assert float(loss) == pytest.approx(-float(log_probs[6]), rel=1e-5)


def test_the_buffer_holds_plain_copies_and_rejects_bad_options():
    examples = [{"input_ids": torch.tensor([1, 2, 3]), "labels": [-100, 2, 3], "task_id": 0}]
    buffer = ReplayBuffer(2, "random")
    buffer.add_task(0, examples, torch.Generator().manual_seed(0))
    examples[0]["labels"][1] = 99  # the task's own lists may change later: the buffer keeps its copy
    assert buffer.examples == [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "task_id": 0}]
    assert type(buffer.examples[0]["input_ids"][0]) is int
    assert buffer.tokens() == 3 and len(buffer.sample(1, torch.Generator())) == 1
    expected = "^sampling: expected one of reservoir, random, importance, hardest, got 'newest'$"
    with pytest.raises(ValueError, match=expected):
        ReplayBuffer(2, "newest")
    with pytest.raises(ValueError, match=r"^sampling=hardest needs a score function \(per-example losses\)$"):
        ReplayBuffer(2, "hardest").add_task(0, examples, torch.Generator())


def test_importance_sampling_follows_exp_minus_loss_over_proposal():
    losses = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(importance_weights(losses), torch.softmax(-losses.double(), 0))
    log_q = torch.log(torch.tensor([0.4, 0.4, 0.1, 0.1]))
    w = torch.exp(-losses.double()) / log_q.exp().double()
    assert torch.allclose(importance_weights(losses, log_q), w / w.sum())
    # a one-slot buffer keeps example i with probability w_i = softmax(-loss)_i (pool = the whole task)
    examples, reps = make_task(0, 4), 3000
    picks = torch.zeros(4)
    for rep in range(reps):
        buffer = ReplayBuffer(1, "importance")
        buffer.add_task(0, examples, torch.Generator().manual_seed(rep),
                        score=lambda ex: losses[[e["input_ids"][0] for e in ex]])
        picks[buffer.examples[0]["input_ids"][0]] += 1
    expected = importance_weights(losses).float() * reps
    assert chi_square(picks, expected) < 16.3  # 3 degrees of freedom, 0.999 quantile
    assert picks[0] > picks[1] > picks[2] > picks[3]  # low loss is preferred, as P ∝ exp(-loss) says


def test_example_losses_equal_unpadded_losses():
    model = tiny_model(vocab=50)
    examples = make_task(0, 7, vocab=50)
    ctx = make_ctx(model, [examples])
    batched = example_losses(ctx, examples, batch_size=3)
    assert not batched.requires_grad  # scored without a graph
    with torch.no_grad():
        for e, value in zip(examples, batched, strict=True):
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            alone = causal_lm_loss(model(input_ids=ids).logits, labels)
            assert float(value) == pytest.approx(float(alone), abs=1e-5)


def mixed(replay: Replay, ctx: Context, batches: list[list[dict]]) -> list[list[list[int]]]:
    return [[e["input_ids"] for e in b] for b in replay.train_batches(ctx, batches)]


def test_replay_mixes_the_configured_fraction_and_nothing_when_empty():
    tasks = [make_task(0, 50), make_task(1, 600)]
    ctx = make_ctx(train_sets=tasks)
    replay = Replay(ReplayConfig(buffer_size=20, replay_ratio=0.25))
    batches = [tasks[1][i : i + 5] for i in range(0, 600, 5)]
    assert mixed(replay, ctx, batches) == [[e["input_ids"] for e in b] for b in batches]  # empty buffer
    replay.after_task(ctx)
    ctx.task_index = 1
    out = mixed(replay, ctx, batches)
    from_buffer = sum(1 for b in out for ids in b if ids[0] < 1000)
    assert from_buffer / sum(len(b) for b in out) == pytest.approx(0.25, abs=0.002)
    assert sorted({len(b) - 5 for b in out}) == [1, 2]  # 0.25 * 5 / 0.75 = 5/3 per batch, diffused
    fixed = Replay(ReplayConfig(buffer_size=20, replay_batch_size=4))
    fixed.after_task(make_ctx(train_sets=tasks))
    ctx.batch_size = 12  # two micro-batches of 6 per optimizer step: 4 buffer examples per step
    sixes = [tasks[1][i : i + 6] for i in range(0, 24, 6)]
    assert [len(b) - 6 for b in mixed(fixed, ctx, sixes)] == [2, 2, 2, 2]


@pytest.mark.parametrize("sampling", ["reservoir", "importance"])
def test_state_dict_round_trip_resumes_identically(sampling):
    model = tiny_model(vocab=50)
    tasks = [make_task(t, 30, vocab=50) for t in range(3)]
    ctx = make_ctx(model, tasks)
    cfg = ReplayConfig(buffer_size=10, sampling=sampling, replay_ratio=0.3)
    replay = Replay(cfg)
    replay.after_task(ctx)
    ctx.task_index = 1
    batches = [tasks[1][i : i + 4] for i in range(0, 28, 4)]
    mixed(replay, ctx, batches[:3])  # part of an epoch, then a checkpoint
    blob = io.BytesIO()
    torch.save(replay.state_dict(), blob)
    blob.seek(0)
    resumed = Replay(cfg)
    resumed.load_state_dict(torch.load(blob, weights_only=False))
    assert mixed(resumed, ctx, batches[3:]) == mixed(replay, ctx, batches[3:])
    replay.after_task(ctx)
    resumed.after_task(ctx)
    ctx.task_index = 2
    assert resumed.buffer.examples == replay.buffer.examples
    assert mixed(resumed, ctx, batches) == mixed(replay, ctx, batches)
    assert replay.accounting()["buffer_examples"] == 10 and not math.isnan(replay.owed)


@pytest.mark.parametrize("sampling", ["hardest", "importance"])
def test_on_an_encoder_decoder_the_buffer_scores_by_the_decoders_loss(sampling):
    """tiny_t5: example losses are Hugging Face's own loss of each example alone; ``hardest`` keeps the task's
    highest-loss examples (the pool is the whole task), ``importance`` keeps distinct scored ones; replay then
    trains the next task through the loop."""
    model = tiny_t5()
    ctx = t5_context(model, tasks=2, n=8)
    data = ctx.train_sets[0]
    with torch.no_grad():
        expected = torch.stack([hf_mean_nll(model, e) for e in data])
    torch.testing.assert_close(example_losses(ctx, data, batch_size=3), expected, atol=1e-5, rtol=1e-5)
    replay = Replay(ReplayConfig(buffer_size=3, sampling=sampling, replay_ratio=0.3))
    replay.after_task(ctx)
    kept = [data.index(e) for e in replay.buffer.examples]
    assert len(set(kept)) == 3
    torch.testing.assert_close(torch.tensor(replay.buffer.scores).float(), expected[kept], atol=1e-5, rtol=1e-5)
    if sampling == "hardest":
        assert sorted(kept) == sorted(torch.argsort(expected, descending=True)[:3].tolist())
    ctx.task_index = 1
    before = task_perplexity(ctx, 1)
    train(ctx, replay, 1, epochs=3)
    assert task_perplexity(ctx, 1) < before
