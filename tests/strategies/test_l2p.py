"""L2P (cl_runner/strategies/l2p.py): key selection on hand-made keys and on the model's own queries, the chosen
prompts put in front as concatenated embeddings would be (also through the KV cache), the key term's gradient pulling
the chosen keys toward the query and its scaling over micro-batches, a training example picking the prompts its
scoring picks, the frozen LM, resume, the refusals and a short run."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config, run_quietly
from tiny_lm import CUE, EOS, one_thread, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)

from cl_runner.config.schema import EvalConfig
from cl_runner.core.errors import ConfigError
from cl_runner.scoring.evaluate import Scorer, greedy_generate, label_logprobs
from cl_runner.strategies.base import MicroBatch
from cl_runner.strategies.l2p import ATTRIBUTE, L2P, L2PConfig, input_query, select
from cl_runner.strategies.support import support_errors


def test_the_keys_most_cosine_similar_to_the_query_are_chosen_most_similar_first():
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    queries = torch.tensor([[2.0, 0.2, 0.0], [0.0, 1.0, 0.9]])
    chosen, similarity = select(keys, queries, top_k=3)
    assert chosen.tolist() == [[0, 3, 1], [1, 2, 3]]  # cosine: the length of key 1 (5) does not count
    expected = torch.nn.functional.cosine_similarity(queries[:, None], keys[None], dim=-1).gather(1, chosen)
    torch.testing.assert_close(similarity, expected)


def pooled(**options) -> tuple[torch.nn.Module, object, L2P]:
    """A tiny GPT-2 with an L2P pool made (before task 0), in eval mode, keys set to distinct random values."""
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=2), L2P(L2PConfig(**options))
    strategy.before_task(ctx)
    with torch.no_grad():
        pool = getattr(model, ATTRIBUTE)
        pool.prompts.normal_(generator=torch.Generator().manual_seed(1))
        pool.keys.normal_(generator=torch.Generator().manual_seed(2))
    return model, ctx, strategy


def manual_logits(model, prompts: list[int], ids: list[int]) -> torch.Tensor:
    """The logits of ``ids`` with the pool's prompts ``prompts`` (leftmost first) concatenated in front by hand."""
    hooks = getattr(model, ATTRIBUTE).hooks
    active, hooks.active = hooks.active, []
    try:
        with torch.no_grad():
            pool = getattr(model, ATTRIBUTE).prompts
            embeds = torch.cat([*(pool[k] for k in prompts), model.get_input_embeddings()(torch.tensor(ids))])
            return model(inputs_embeds=embeds[None]).logits[0, -len(ids):]
    finally:
        hooks.active = active


def test_an_input_picks_the_prompts_whose_keys_match_its_query_and_gets_them_in_front():
    model, ctx, strategy = pooled()
    ids = [7, 10, *CUE]
    query = input_query(model, {"input_ids": torch.tensor([ids])}, None, "hidden")[0]
    pool = getattr(model, ATTRIBUTE)
    with torch.no_grad():  # key 7 is the query itself, key 2 nearly, key 5 roughly; the others point away
        pool.keys.copy_(-query.abs().expand_as(pool.keys) * torch.rand(pool.keys.shape[0], 1) - query)
        pool.keys[7], pool.keys[2], pool.keys[5] = query, query + 0.05 * query.norm(), query + 0.3 * query.norm()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0]
    assert strategy.hooks.chosen.tolist() == [[7, 2, 5]]
    torch.testing.assert_close(out, manual_logits(model, [7, 2, 5], ids), atol=1e-5, rtol=1e-5)
    assert (out - manual_logits(model, [2, 7, 5], ids)).abs().max() > 1e-5  # the order matters


def test_rows_of_one_batch_get_their_own_prompts_also_through_the_kv_cache():
    model, ctx, strategy = pooled(top_k=2)
    scorer = Scorer(model=model, pad_id=EOS, eos_id=EOS, device=torch.device("cpu"), autocast=torch.no_grad,
                    batch_size=8, cfg=EvalConfig(), decode=str)
    prompts, labels = [[7, 10, *CUE], [8, 12, 13, 14, 15, *CUE], [9, 20, *CUE]], [[30], [31, 32, 33]]
    scores = label_logprobs(scorer, prompts, labels)  # left-padded together, labels on the prompts' KV cache
    chosen = strategy.hooks.chosen.tolist()
    alone = []
    for p in prompts:  # each prompt alone picks what it picked in the batch
        with torch.no_grad():
            model(input_ids=torch.tensor([p]))
        alone += strategy.hooks.chosen.tolist()
    assert chosen == alone and len({tuple(c) for c in chosen}) > 1  # not every row the same prompts
    for b, p in enumerate(prompts):
        for k, label in enumerate(labels):
            logp = torch.log_softmax(manual_logits(model, chosen[b], p + label).float(), -1)
            want = sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(label))
            assert float(scores[b, k]) == pytest.approx(want, abs=1e-4)
    generated = greedy_generate(scorer, prompts, max_new_tokens=3)
    for b, p in enumerate(prompts):
        out = []
        for _ in range(3):
            token = int(manual_logits(model, chosen[b], p + out)[-1].argmax())
            if token == EOS:
                break
            out.append(token)
        assert generated[b] == out


def test_a_training_example_picks_the_prompts_its_prompt_alone_picks_when_scored():
    model, ctx, strategy = pooled()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5  # dropout on in training: the query must still be the frozen model's, without it
    examples = ctx.train_sets[0][:3]
    batch = ctx.collate(examples)  # right-padded prompt + target, as the loop trains
    model.train()
    ctx.micro = MicroBatch(examples, examples, 1.0)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    trained = strategy.hooks.chosen.tolist()
    model.eval()
    ctx.micro = None
    scored = []
    for e in examples:
        prompt = e["input_ids"][: len(e["input_ids"]) - 2]  # answer + EOS are the target
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt]))
        scored += strategy.hooks.chosen.tolist()
    assert trained == scored
    with torch.no_grad():  # without the prompt lengths the query would average over the target too
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert strategy.hooks.chosen.tolist() != trained


def test_the_key_term_pulls_the_chosen_keys_toward_the_query_and_leaves_the_others():
    model, ctx, strategy = pooled(pull_constraint_coeff=0.5)
    examples = ctx.train_sets[0][:4]
    batch = ctx.collate(examples)
    model.train()
    ctx.micro = MicroBatch(examples, examples, 1.0)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    chosen = strategy.hooks.chosen
    term = strategy.loss(ctx, batch, None, torch.zeros(()))  # the plain loss is 0: only the key term
    keys = getattr(model, ATTRIBUTE).keys
    term.backward()
    query = input_query(model, batch, [len(e["input_ids"]) - 2 for e in examples], "hidden")
    q, k = torch.nn.functional.normalize(query, dim=-1), keys.detach()
    expected = torch.zeros_like(keys)
    for b in range(4):  # d/dk of -0.5/4 * cos(q, k) = -0.5/4 * (q_hat - cos k_hat) / |k|, per chosen key
        for j in chosen[b].tolist():
            k_hat = k[j] / k[j].norm()
            expected[j] -= 0.5 / 4 * (q[b] - (q[b] @ k_hat) * k_hat) / k[j].norm()
    torch.testing.assert_close(keys.grad, expected, atol=1e-6, rtol=1e-4)
    unchosen = sorted(set(range(10)) - set(chosen.flatten().tolist()))
    assert unchosen and torch.equal(keys.grad[unchosen], torch.zeros(len(unchosen), keys.shape[1]))
    before = select(k, query, 3)[1].sum()
    after = select(k - 0.1 * keys.grad, query, 3)[1].sum()  # a step down the gradient: closer to the queries
    assert after > before


def test_the_key_term_sums_to_the_step_mean_over_micro_batches():
    model, ctx, strategy = pooled()
    examples = ctx.train_sets[0][:4]
    model.train()
    terms = {}
    for parts in ([examples], [examples[:1], examples[1:]]):
        total = 0.0
        for part in parts:
            weight = len(part) / 4  # every example has 2 target tokens: the share of the step's targets
            ctx.micro = MicroBatch(part, examples, weight)
            batch = ctx.collate(part)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            total += float(strategy.loss(ctx, batch, None, torch.zeros(())).detach()) * weight  # as the loop does
        terms[len(parts)] = total
    assert terms[1] == pytest.approx(terms[2], rel=1e-6) and terms[1] < 0


def test_only_the_pool_trains_the_lm_stays_bit_identical_and_the_accounting_counts_it():
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=2), L2P(L2PConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(ctx, strategy, 0, lr=0.1)
    pool = getattr(model, ATTRIBUTE)
    made = {k: v.clone() for k, v in pool.state_dict().items()}
    train(ctx, strategy, 1, lr=0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the LM, embeddings and head included
    assert not torch.equal(made["prompts"], pool.prompts) and not torch.equal(made["keys"], pool.keys)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{ATTRIBUTE}.prompts",
                                                                          f"{ATTRIBUTE}.keys"]
    cost = strategy.accounting()
    assert cost["extra_parameters"] == 10 * 5 * 32 + 10 * 32 and cost["prompt_tokens_at_eval"] == 15
    selections = [sum(cost["l2p_prompt_selections"][t]) for t in ("t0", "t1")]
    assert selections == [3 * 8 * 2, 3 * 8 * 2]  # top_k x examples x epochs


def test_resume_recreates_the_pool_and_its_counts():
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=2), L2P(L2PConfig())
    train(ctx, strategy, 0, lr=0.1)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[7, 10, *CUE]])).logits
    fresh = tiny_model(seed=1)
    resumed = L2P(L2PConfig())
    resumed.load_state_dict(strategy.state_dict())
    resumed.on_resume(tiny_context(fresh, tasks=2))
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=torch.tensor([[7, 10, *CUE]])).logits, expected)
    assert resumed.hooks.counts.tolist() == strategy.hooks.counts.tolist() and resumed.counts == strategy.counts
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [f"{ATTRIBUTE}.prompts", f"{ATTRIBUTE}.keys"]


@pytest.mark.parametrize("overrides", [["strategy.top_k=0"], ["strategy.query=cls"], ["strategy.top_k=11"],
                                       ["strategy.pull_constraint_coeff=-1"], ["train.pack=true"]])
def test_bad_options_and_packing_are_refused_with_their_key(overrides):
    key = overrides[0].split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}: "):
        make_config("strategy=l2p", *overrides)


def test_fsdp_is_refused_in_one_line_and_ddp_runs():
    errors = support_errors(L2P, [L2PConfig()], distributed="fsdp")
    assert len(errors) == 1 and "\n" not in errors[0] and errors[0].endswith("use distributed=ddp")
    assert support_errors(L2P, [L2PConfig()], distributed="ddp") == []


def test_prompts_too_long_for_the_context_are_refused():
    with pytest.raises(ConfigError, match="strategy.length: 3 x 20 prompt tokens"):
        L2P(L2PConfig(length=20)).check(tiny_context(tiny_model()))


@pytest.mark.slow
def test_a_short_run_completes_with_the_pool_in_its_accounting(tmp_path):
    result = run_quietly(make_config("strategy=l2p", "train.lr=0.1"), tmp_path / "run")
    accounting = result["strategy_accounting"]
    assert result["status"] == "completed"
    assert set(accounting["l2p_prompt_selections"]) == {"color", "city", "food"}
    assert accounting["prompt_tokens_at_eval"] == 15
