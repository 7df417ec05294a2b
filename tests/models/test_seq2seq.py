"""Encoder-decoder models (cl_runner/models/seq2seq.py) on a tiny T5 built from conf/model/tiny_t5.yaml, CPU, offline:
the batch split into encoder input and decoder targets gives Hugging Face's own loss; greedy generation equals
``generate``; label scoring equals a full forward per label; perplexity equals HF's loss per item; a T5 saved
with save_pretrained loads by path; what cannot work is refused in one line (exit 2); strategies learn and a
kill -9 resume is exact."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from helpers import cl_run, make_config, run_quietly

from cl_runner.config.schema import EvalConfig, ModelConfig
from cl_runner.core.errors import ConfigError
from cl_runner.engine.loop import split, weighted
from cl_runner.models.kinds import kind_of
from cl_runner.models.lm import IGNORE_INDEX, causal_lm_loss, collate, target_count, target_mask
from cl_runner.models.load import load_model, load_tokenizer, train_tokenizer
from cl_runner.models.seq2seq import config_errors, config_is_encoder_decoder
from cl_runner.scoring import evaluate
from cl_runner.scoring.evaluate import Scorer
from cl_runner.strategies.registry import strategy_class
from cl_runner.tasks.encode import EvalItem

TEXTS = ["the capital of france is paris", "colour of the sky: blue", "question: what is red? answer: a rose",
         "a quick brown fox jumps over the lazy dog"] * 4
TASKS = [{"name": n, "source": "facts", "relation": n, "num_subjects": 16, "metric": "exact_match"}
         for n in ("color", "city")]


@pytest.fixture(scope="module")
def t5():
    """(model, tokenizer): the tiny T5 of conf/model/tiny_t5.yaml, dropout off, in eval mode."""
    tokenizer = train_tokenizer(TEXTS, 257)
    cfg = make_config("model=tiny_t5", "+model.arch.dropout_rate=0.0").model
    model = load_model(cfg, tokenizer, seed=0)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id
    batch, kind = examples(tokenizer), kind_of(model)  # a few steps on them: generation then says something
    inputs = kind.model_batch(collate(batch, tokenizer.pad_token_id), batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        causal_lm_loss(model(**kind.model_inputs(inputs)).logits, inputs["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


def encoded(tokenizer, prompt: str, target: str) -> dict:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t, "task_id": 0}


def examples(tokenizer) -> list[dict]:
    pairs = [("the capital of france is", "paris"), ("sky:", "blue sky over the dog"), ("what is red?", "a rose"),
             ("a quick brown fox jumps over the", "lazy dog")]
    return [encoded(tokenizer, p, t) for p, t in pairs]


def scorer(model, tokenizer, **eval_options) -> Scorer:
    return Scorer(model=model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                  device=torch.device("cpu"), autocast=nullcontext, batch_size=8, cfg=EvalConfig(**eval_options),
                  decode=tokenizer.decode, kind=kind_of(model))


def hf_rows(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows])


def test_the_loss_on_decoder_targets_is_hugging_faces_own(t5):
    model, tok = t5
    batch, kind = examples(tok), kind_of(model)
    ours = kind.model_batch(collate(batch, tok.pad_token_id), batch)
    synced = kind.model_batch(collate(batch, tok.pad_token_id))  # lengths read from the batch instead
    assert all(torch.equal(ours[k], synced[k]) for k in ours)
    prompts = [e["input_ids"][: len(e["input_ids"]) - target_count(e)] + [tok.eos_token_id] for e in batch]
    targets = [e["input_ids"][len(e["input_ids"]) - target_count(e) :] for e in batch]
    assert ours["input_ids"].tolist() == hf_rows(prompts, tok.pad_token_id).tolist()
    assert int(target_mask(ours["labels"]).sum()) == sum(target_count(e) for e in batch)  # loop weighting
    with torch.no_grad():
        loss = causal_lm_loss(model(**kind.model_inputs(ours)).logits, ours["labels"])
        hf = model(input_ids=hf_rows(prompts, tok.pad_token_id), attention_mask=hf_rows(prompts, -1) != -1,
                   labels=hf_rows(targets, IGNORE_INDEX)).loss
    assert float(loss) == pytest.approx(float(hf), rel=1e-5)


def test_micro_batches_weighted_by_target_tokens_give_the_whole_batch_gradient(t5):
    model, tok = t5
    batch, kind = examples(tok), kind_of(model)

    def grads(parts: list[tuple[list[dict], float]]) -> torch.Tensor:
        model.zero_grad()
        for part, weight in parts:
            inputs = kind.model_batch(collate(part, tok.pad_token_id), part)
            (causal_lm_loss(model(**kind.model_inputs(inputs)).logits, inputs["labels"]) * weight).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = grads([(batch, 1.0)])
    assert torch.allclose(grads(weighted(split(batch, 3))), whole, atol=1e-6)
    model.zero_grad()


def test_greedy_generation_equals_hugging_faces_generate(t5):
    model, tok = t5
    prompts = [e["input_ids"][: len(e["input_ids"]) - target_count(e)] for e in examples(tok)]
    ours = evaluate.greedy_generate(scorer(model, tok), prompts, max_new_tokens=7)  # one padded batch
    assert len({tuple(tokens) for tokens in ours}) > 2  # not all empty (EOS first) nor all the same
    for prompt, tokens in zip(prompts, ours, strict=True):
        out = model.generate(input_ids=torch.tensor([prompt + [tok.eos_token_id]]), max_new_tokens=7,
                             do_sample=False, num_beams=1)[0, 1:].tolist()  # without the decoder start token
        assert tokens == (out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_label_scoring_equals_a_full_forward_per_label(t5, length_normalize):
    model, tok = t5
    prompts = [e["input_ids"][: len(e["input_ids"]) - target_count(e)] for e in examples(tok)]
    labels = [tok(w, add_special_tokens=False)["input_ids"] for w in ("paris", "blue sky over", "a rose")]
    assert len({len(label) for label in labels}) > 1
    ours = evaluate.label_logprobs(scorer(model, tok, length_normalize=length_normalize), prompts, labels)
    start = model.config.decoder_start_token_id
    for b, prompt in enumerate(prompts):
        for k, label in enumerate(labels):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + [tok.eos_token_id]]),
                               decoder_input_ids=torch.tensor([[start, *label[:-1]]])).logits[0]
            expected = float(torch.log_softmax(logits, -1)[range(len(label)), label].sum())
            expected /= len(label) if length_normalize else 1
            assert float(ours[b, k]) == pytest.approx(expected, abs=1e-4)


def test_perplexity_is_the_decoder_nll_of_the_targets(t5):
    model, tok = t5
    items = [EvalItem(prompt_ids=e["input_ids"][: len(e["input_ids"]) - target_count(e)],
                      target_ids=e["input_ids"][len(e["input_ids"]) - target_count(e) :], target="") for e in
             examples(tok)]
    nll = 0.0
    for it in items:
        with torch.no_grad():
            nll += float(model(input_ids=torch.tensor([it.prompt_ids + [tok.eos_token_id]]),
                               labels=torch.tensor([it.target_ids])).loss) * len(it.target_ids)
    result = evaluate.perplexity(scorer(model, tok), items)
    assert result["tokens"] == sum(len(it.target_ids) for it in items)
    assert result["score"] == pytest.approx(math.exp(nll / result["tokens"]), rel=1e-5)


def test_a_t5_saved_to_disk_loads_by_path(t5, tmp_path):
    model, tok = t5
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    cfg = ModelConfig(name_or_path=str(tmp_path / "t5"))
    assert config_is_encoder_decoder(cfg)
    loaded = load_model(cfg, load_tokenizer(cfg, []), seed=1)
    assert type(loaded) is type(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize(("overrides", "line"), [
    (["train.pack=true"], "train.pack: not supported with an encoder-decoder model"),
    (["strategy=lamol"], "strategy.name: lamol is not supported with an encoder-decoder model"),
    (["strategy=progressive"], "strategy.name: progressive is not supported with an encoder-decoder model"),
    (["strategy=ewc", "strategy.fisher=sampled"], "strategy.fisher: sampled is not supported"),
])
def test_what_cannot_work_with_an_encoder_decoder_is_refused(overrides, line):
    with pytest.raises(ConfigError) as refused:
        make_config("model=tiny_t5", *overrides)
    assert str(refused.value).startswith(line) and "\n" not in str(refused.value)
    assert config_errors(make_config(*overrides)) == []  # the causal default model runs them


def test_a_strategy_is_refused_once_the_model_is_loaded_when_the_config_could_not_tell(t5):
    model, _ = t5
    assert not config_is_encoder_decoder(ModelConfig(name_or_path="google-t5/t5-large"))  # not cached: no network
    loaded = SimpleNamespace(model=model, kind=kind_of(model), device=torch.device("cpu"))  # what Strategy.check reads
    with pytest.raises(ConfigError, match="strategy.name: progressive is not supported with an encoder-decoder"):
        strategy_class("progressive")(strategy_class("progressive").Config()).check(loaded)
    with pytest.raises(ConfigError, match="strategy.fisher: sampled is not supported with an encoder-decoder"):
        strategy_class("ewc")(strategy_class("ewc").Config(fisher="sampled")).check(loaded)
    strategy_class("replay")(strategy_class("replay").Config(sampling="hardest")).check(loaded)  # the kind scores
    strategy_class("lwf")(strategy_class("lwf").Config()).check(loaded)


@pytest.mark.parametrize("name", ["t5-small", "t5-large", "flan-t5-base", "flan-t5-large"])
def test_the_hub_t5_configs_compose(name):
    assert make_config(f"model={name}").model.name_or_path.endswith(f"/{name}")


@pytest.mark.slow
def test_a_refusal_is_one_line_and_exit_2(t5, tmp_path):
    model, tok = t5
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")  # a local directory: detected from its config.json
    proc = cl_run(f"model.name_or_path={tmp_path / 't5'}", "train.pack=true", f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cl-run: error: train.pack: not supported with an encoder-decoder model (packed rows would need "
        "block-diagonal cross-attention); set train.pack=false"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "options"), [
    ("naive", []), ("replay", ["strategy.buffer_size=8"]), ("ewc", []), ("lwf", []), ("adapters", []),
    # those that run the model on batches of their own, through the model kind (models/kinds.py)
    ("der", []), ("agem", []), ("gem", []), ("ilora", []),
    ("replay", ["strategy.buffer_size=8", "strategy.sampling=hardest"]),
    ("replay", ["strategy.buffer_size=8", "strategy.sampling=importance"]),
])
def test_strategies_train_a_t5_and_its_loss_falls(tmp_path, strategy, options):
    cfg = make_config("model=tiny_t5", f"strategy={strategy}", "train.epochs=3", "train.keep_best=false",
                      "checkpoint.enabled=false", *options, tasks=TASKS)
    result = run_quietly(cfg, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    for task in ("color", "city"):
        losses = [h["train_loss"] for h in history if h["task"] == task]
        assert len(losses) == 3 and losses[-1] < losses[0], (task, losses)
    assert result["status"] == "completed" and len(result["stages"]) == 3  # scored before and after each task
    second = [h["extras"] for h in history if h["task"] == "city"]
    if strategy in ("ewc", "lwf"):  # the penalty / distillation term ran on the second task
        assert all(second)
    if strategy in ("der", "ilora"):  # the logit distance / hidden-state consistency, at every epoch
        assert all(extras[f"{strategy}_{'distance' if strategy == 'der' else 'consistency'}"] > 0 for extras in second)
    if strategy in ("agem", "gem"):  # a reference gradient at every step with a buffer
        steps = 3 * math.ceil(16 / cfg.train.batch_size)  # the second task's: 3 epochs of 16 examples
        assert result["strategy_accounting"][f"{strategy}_steps_with_buffer"] == steps
    if "sampling" in " ".join(options):
        assert result["strategy_accounting"]["buffer_per_task"] == {0: 4, 1: 4}


@pytest.mark.slow
def test_t5_sigkill_then_resume_is_identical(tmp_path):
    from resume_runs import kill_and_resume, outcome, reference

    args = ("model=tiny_t5", "strategy=lwf", "train.epochs=3", *[f"tasks.tasks.{i}.num_subjects=16" for i in range(3)])
    expected = reference(tmp_path, *args)
    assert kill_and_resume(tmp_path / "killed", [(4, 0.05)], *args) == 1  # in task 2: the teacher is in use
    assert outcome(tmp_path / "killed") == expected
