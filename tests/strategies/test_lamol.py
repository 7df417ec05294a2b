"""lamol: samples parse into the task's encoded format (malformed ones are dropped, each for its reason); a model
that learnt to generate yields well-formed pseudo-examples, the same ones for the same seed, written where
users can read them; generation tokens are new mean-initialised rows; gen_ratio=0 is naive exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import make_config, run_quietly
from resume_runs import kill_and_resume, outcome, reference
from safetensors.torch import load_file
from tiny_lm import CUE, EOS, VOCAB, one_thread, task_examples, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)

from cl_runner.core.errors import ConfigError
from cl_runner.engine.checkpoint import list_checkpoints
from cl_runner.models.lm import IGNORE_INDEX
from cl_runner.strategies.lamol import LAMOL, LAMOLConfig
from cl_runner.strategies.pseudo import answer_cue, generation_batch, parse_sample


def test_answer_cue_is_the_shared_prompt_ending():
    assert answer_cue(task_examples(0)) == CUE
    assert answer_cue(task_examples(0)[:1]) == task_examples(0)[0]["input_ids"][:4]  # one prompt: all of it


def test_samples_parse_into_the_encoded_task_format_or_are_dropped_with_a_reason():
    example, outcome = parse_sample([7, 12, *CUE, 33, 34, EOS], CUE, EOS, min_prompt=3, task_id=2)
    assert outcome == "kept"
    assert example == {"input_ids": [7, 12, *CUE, 33, 34, EOS], "labels": [IGNORE_INDEX] * 4 + [33, 34, EOS],
                       "task_id": 2}
    cases = {"no_end": [7, 12, *CUE, 33], "no_cue": [7, 12, 33, EOS], "empty_answer": [7, 12, *CUE, EOS],
             "empty_prompt": [*CUE, 33, EOS], "eos_inside": [7, 12, *CUE, 33, EOS, 34, EOS]}
    for reason, tokens in cases.items():
        assert parse_sample(tokens, CUE, EOS, min_prompt=3, task_id=0) == (None, reason), reason


def test_the_generation_batch_prepends_the_task_token_and_targets_every_real_token():
    ctx = tiny_context(tiny_model())
    shorter = {"input_ids": [8, 10, *CUE, 31], "labels": [IGNORE_INDEX] * 4 + [31], "task_id": 1}
    batch = ctx.collate([ctx.train_sets[0][0], shorter])
    gen = generation_batch(batch, torch.tensor([100, 101]))
    assert gen["input_ids"][:, 0].tolist() == [100, 101]
    assert gen["labels"][0].tolist() == [IGNORE_INDEX, *ctx.train_sets[0][0]["input_ids"]]
    assert gen["labels"][1, -1] == IGNORE_INDEX and gen["attention_mask"][1].tolist() == [1] * 6 + [0]


def learnt_generator(gen_ratio: float = 1.0):
    """A tiny LM trained on task 0 (with the generation loss) until it can write task-0 examples."""
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=2), LAMOL(LAMOLConfig(gen_ratio=gen_ratio, lm_lambda=1.0, top_k=5))
    train(ctx, strategy, 0, epochs=40)
    ctx.task_index = 1
    return model, ctx, strategy


def test_a_trained_generator_writes_well_formed_pseudo_examples_reproducibly():
    model, ctx, strategy = learnt_generator()
    strategy.before_task(ctx)
    pseudo = strategy.pseudo
    stats = strategy.stats["t0"]
    assert stats["sampled"] == 8 and sum(v for k, v in stats.items() if k != "sampled") == 8
    assert len(pseudo) >= 6  # the LM learnt the format: most samples are kept
    for example in pseudo:  # the encoded format of a real task-0 example
        n_prompt = example["labels"].count(IGNORE_INDEX)
        assert example["task_id"] == 0 and example["input_ids"][-1] == EOS
        assert example["input_ids"][n_prompt - len(CUE) : n_prompt] == CUE and n_prompt > len(CUE)
        assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:] and n_prompt < len(example["labels"]) - 1
    assert strategy.train_dataset(ctx, ctx.train_sets[1]) == ctx.train_sets[1] + pseudo
    lines = [json.loads(line) for line in ctx.artifacts["lamol_pseudo_t0.jsonl"].splitlines()]
    kept = [line for line in lines if line["outcome"] == "kept"]
    assert len(lines) == 8 and len(kept) == len(pseudo) >= 6
    # the file shows each kept example as it is trained on: its prompt, and its answer without the EOS
    def shown(example: dict) -> tuple[str, str]:
        ids, n_prompt = example["input_ids"], example["labels"].count(IGNORE_INDEX)
        return " ".join(map(str, ids[:n_prompt])), " ".join(map(str, ids[n_prompt:-1]))

    assert [(line["prompt"], line["answer"]) for line in kept] == [shown(e) for e in pseudo]
    assert all(re.fullmatch(r"7 \d+ 5 6", line["prompt"]) for line in kept)  # task 0's relation, a subject, the cue
    again = LAMOL(strategy.cfg)
    again.first_gen_id = strategy.first_gen_id
    assert again._generate(ctx, 0, 8) == pseudo  # the same seed, task and model: the same samples


def test_generation_tokens_are_new_rows_initialised_to_the_mean():
    model = tiny_model()
    old = model.get_input_embeddings().weight.detach().clone()
    ctx, strategy = tiny_context(model, tasks=3), LAMOL(LAMOLConfig())
    rng_before = torch.get_rng_state()
    strategy.before_task(ctx)
    assert torch.equal(torch.get_rng_state(), rng_before)  # adding them draws nothing from the global RNG
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == VOCAB + 3 and strategy.first_gen_id == VOCAB
    assert torch.equal(weight[:VOCAB], old) and torch.allclose(weight[VOCAB:], old.mean(0).expand(3, -1))
    fresh = tiny_model(seed=1)
    resumed = LAMOL(LAMOLConfig())
    resumed.load_state_dict(strategy.state_dict())
    resumed.on_resume(tiny_context(fresh, tasks=3))
    fresh.load_state_dict(model.state_dict())  # strict: the resumed model has the same rows


def final_run(tmp_path, name: str, *overrides: str) -> tuple[list, dict]:
    result = run_quietly(make_config(*overrides, "train.epochs=2"), tmp_path / name)
    rows = [[stage["scores"][n]["score"] for n in result["tasks"]] for stage in result["stages"]]
    return rows, load_file(str(list_checkpoints(tmp_path / name)[-1] / "model.safetensors"))


@pytest.mark.slow
def test_a_run_killed_after_generating_resumes_with_the_same_pseudo_examples(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: one thread is faster
    args = ("strategy=lamol", "strategy.gen_ratio=0.25", "train.epochs=10", "checkpoint.every_n_steps=7")
    expected = reference(tmp_path, *args)  # 10 epochs: the LM writes well-formed examples by the second task
    assert kill_and_resume(tmp_path / "killed", [(14, 0.05)], *args) == 1  # inside the second task
    assert outcome(tmp_path / "killed") == expected
    for task in ("color", "city"):
        name = f"lamol_pseudo_{task}.jsonl"
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "reference" / name).read_text()
    kept = json.loads((tmp_path / "reference" / "metrics.json").read_text())["strategy_accounting"]
    assert kept["pseudo_examples_trained"] > 0


@pytest.mark.slow
def test_gen_ratio_zero_is_naive_exactly(tmp_path):
    naive_rows, naive_weights = final_run(tmp_path, "naive", "strategy=naive")
    lamol_rows, lamol_weights = final_run(tmp_path, "lamol", "strategy=lamol", "strategy.gen_ratio=0")
    assert lamol_rows == naive_rows
    assert naive_weights.keys() == lamol_weights.keys()
    assert all(torch.equal(naive_weights[k], lamol_weights[k]) for k in naive_weights)


@pytest.mark.slow
def test_lamol_end_to_end_writes_readable_pseudo_examples(tmp_path):
    run_dir = tmp_path / "run"
    result = run_quietly(make_config("strategy=lamol", "train.epochs=1", "strategy.gen_ratio=0.25"), run_dir)
    cost = result["strategy_accounting"]
    assert cost["generation_tokens"] == 3 and cost["extra_parameters"] == 3 * 128
    assert set(cost["pseudo_examples"]) == {"color", "city"}
    for task in ("color", "city"):
        lines = [json.loads(line) for line in (run_dir / f"lamol_pseudo_{task}.jsonl").read_text().splitlines()]
        assert len(lines) == 16 and all(line["task"] == task and line["generated_before"] for line in lines)
        assert all(("prompt" in line) == (line["outcome"] == "kept") for line in lines)


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.gen_ratio=-0.1"], "strategy.gen_ratio: expected a non-negative"),
    (["strategy.top_k=0"], "strategy.top_k: expected a positive"),
    (["strategy.temperature=0"], "strategy.temperature: expected a positive"),
])
def test_bad_options_fail_with_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("strategy=lamol", *overrides)


def test_tasks_without_an_answer_cue_are_refused_with_a_clear_message():
    ctx = tiny_context(tiny_model(), tasks=2)
    ctx.train_sets[0][1] = {**ctx.train_sets[0][1], "input_ids": [7, 11, 9, 30, EOS],
                            "labels": [IGNORE_INDEX] * 3 + [30, EOS]}  # a prompt not ending in the cue
    strategy = LAMOL(LAMOLConfig())
    ctx.task_index = 1
    with pytest.raises(ConfigError, match="share no ending"):
        strategy.before_task(ctx)


@pytest.mark.gpu
def test_runs_on_cuda_in_bf16(tmp_path):
    result = run_quietly(make_config("strategy=lamol", "device=cuda", "train.epochs=1"), tmp_path)
    assert result["status"] == "completed" and result["precision"] == "bf16"
