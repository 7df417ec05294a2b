"""Sequence-wide evaluation options and what evaluation shows (issue 15): ``eval.max_examples`` (a seeded subset
per task and split, the same at every stage; a task's own ``max_eval_examples`` wins), the progress bar of an
evaluation pass, its seconds in metrics.json, and no deprecation warning from the KV cache (transformers' Cache
API under the keyword the installed version takes)."""

import io
import json
import warnings
from contextlib import nullcontext

import pytest
import torch
from helpers import make_config, run_quietly
from rich.console import Console
from tiny_loop import context, examples, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cl_runner.config.schema import EvalConfig
from cl_runner.core.errors import ConfigError
from cl_runner.models.generation import cached_forward
from cl_runner.scoring.evaluate import Scorer, score_task
from cl_runner.scoring.sequence import SequenceScorer
from cl_runner.strategies.base import Strategy
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask, EvalItem


def _sequence(n: int, max_examples: int | None, seed: int = 0, validation_cap: int | None = None) -> SequenceScorer:
    items = [EvalItem(prompt_ids=[3 + i % 30, 4], target_ids=[5, 1], target="") for i in range(n)]
    encoded = EncodedTask(name="a", train=[], validation=items, test=items, label_ids=None)
    scorer = Scorer(model=tiny_model(), pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=nullcontext,
                    batch_size=8, cfg=EvalConfig(), decode=str)
    task = Task(name="a", metric="perplexity", train=[], validation=[], test=[])
    return SequenceScorer(scorer, [task], [encoded], Strategy(), context(scorer.model, examples(4)),
                          max_validation_examples=validation_cap, seed=seed, max_examples=[max_examples])


def test_max_examples_scores_a_seeded_subset_the_same_at_every_stage():
    sequence = _sequence(40, 10)
    test = sequence.eval_set(0, "test").test
    where = [[id(it) for it in sequence.encoded[0].test].index(id(it)) for it in test]
    assert len(test) == 10 and where == sorted(set(where))  # examples of the split, in their order
    assert sequence.eval_set(0, "test").test is test  # the same subset at every stage
    assert _sequence(40, 10).eval_set(0, "test").test == test  # and in every process of the run
    assert _sequence(40, 10, seed=1).eval_set(0, "test").test != test
    assert [r["n"] for r in sequence.score()] == [10]
    assert sequence.score("validation", [0])[0]["n"] == 10  # validation too
    assert _sequence(40, 10, validation_cap=4).score("validation", [0])[0]["n"] == 4  # then its own cap
    assert [r["n"] for r in _sequence(40, None).score()] == [40]
    assert [r["n"] for r in _sequence(6, 10).score()] == [6]  # fewer than the cap: all of them


def test_max_examples_must_be_positive():
    with pytest.raises(ConfigError, match="eval.max_examples"):
        make_config("eval.max_examples=0")


@pytest.mark.parametrize("terminal", [True, False])
def test_an_evaluation_pass_shows_a_bar_then_one_line_and_records_its_seconds(terminal):
    sequence, out = _sequence(24, None), io.StringIO()
    sequence.progress.attach(Console(file=out, width=120, force_terminal=terminal, color_system=None))
    sequence.score(label="eval after a")
    assert ("24/24 examples" in out.getvalue()) == terminal  # a log file gets no bar...
    assert "eval after a · 1 task · 24 examples · " in out.getvalue()  # ...but the stage's line
    assert sequence.take_timing()["eval"] > 0
    shown = out.getvalue()
    sequence.validate([0])
    sequence.validate([0])
    assert terminal or out.getvalue() == shown  # validation passes leave no line
    timing = sequence.take_timing()
    assert timing["validation"] > 0 and sequence.take_timing()["validation"] == 0  # counted since the last stage
    quiet = _sequence(24, None)
    quiet.progress.attach(Console(file=io.StringIO(), quiet=True))  # ranks other than 0
    quiet.score()
    assert quiet.progress.console is None


@pytest.mark.slow
def test_sequence_wide_max_examples_a_task_s_own_cap_wins_and_seconds_per_stage(tmp_path):
    cfg = make_config("train.epochs=1", "checkpoint.enabled=false", "eval.max_examples=5",
                      "tasks.tasks.1.max_eval_examples=12", "train.max_examples=16")
    result = run_quietly(cfg, tmp_path)
    assert [result["examples"][name]["train"] for name in ("color", "city", "food")] == [16] * 3  # its training twin
    assert [{name: s["n"] for name, s in stage["scores"].items()} for stage in result["stages"]] == [
        {"color": 5, "city": 12, "food": 5}] * 4
    seconds = result["eval_seconds_per_stage"]
    assert list(seconds) == ["init", "after_color", "after_city", "after_food"]
    assert [s["eval"] > 0 for s in seconds.values()] == [True] * 4
    # keep_best with epochs=1: one epoch has nothing to choose, so no task is validated (validation seconds
    # per stage: test_an_evaluation_pass_shows_a_bar_then_one_line_and_records_its_seconds above)
    assert [s["validation"] for s in seconds.values()] == [0, 0, 0, 0]
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["validation_score"] for r in history] == [None] * 3


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                        bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                                      bos_token_id=1, eos_token_id=1)).eval()


@pytest.mark.parametrize("make_model", [_gpt2, _llama])
def test_generation_and_label_scoring_emit_no_deprecation_warning(make_model):
    model = make_model()
    scorer = Scorer(model=model, pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=nullcontext,
                    batch_size=4, cfg=EvalConfig(), decode=str)
    items = [EvalItem(prompt_ids=[5 + i, 6, 7][: 1 + i % 3], target_ids=[9, 1], target="[20]") for i in range(6)]
    task = EncodedTask(name="t", train=[], validation=[], test=items, label_ids=[[20], [21, 22, 23]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for metric in ("exact_match", "label_accuracy", "perplexity"):
            assert score_task(scorer, task, metric, "\n", ["[20]", "[21, 22, 23]"])["n"] == 6


def test_cached_forward_continues_as_one_long_forward():
    model = _llama()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1]
        _, cache = cached_forward(model, None, input_ids=ids[:, :3])
        out, cache = cached_forward(model, cache, input_ids=ids[:, 3:])
    assert torch.allclose(out.logits[:, -1], whole, atol=1e-5) and cache.get_seq_length() == 5


def test_a_tasks_own_generation_budget_wins_over_eval_max_new_tokens(monkeypatch):
    from types import SimpleNamespace

    import torch

    import cl_runner.scoring.evaluate as ev
    from cl_runner.config.schema import EvalConfig

    seen = []
    monkeypatch.setattr(ev, "score_generations", lambda scorer, items, metric, reading, budget:
                        seen.append(budget) or {"score": 0.0, "examples": []})
    scorer = ev.Scorer(model=torch.nn.Linear(1, 1), pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=None,
                       batch_size=1, cfg=EvalConfig(max_new_tokens=7), decode=str)
    task = SimpleNamespace(test=[SimpleNamespace(target_ids=[1, 2, 3])], validation=[], stop_ids=[])
    ev.score_task(scorer, task, "exact_match", "\n", None, "test", 3)  # the task's own budget
    ev.score_task(scorer, task, "exact_match", "\n", None, "test", None)  # eval.max_new_tokens
    scorer.cfg = EvalConfig()
    ev.score_task(scorer, task, "exact_match", "\n", None)  # the longest target + 2
    assert seen == [3, 7, 5]


def test_a_tasks_own_eval_batch_size_and_budget_reach_its_scoring(monkeypatch):
    from types import SimpleNamespace

    import torch

    import cl_runner.scoring.sequence as ss
    from cl_runner.config.schema import EvalConfig
    from cl_runner.scoring.evaluate import Scorer
    from cl_runner.strategies.base import Strategy
    from cl_runner.tasks.base import Task
    from cl_runner.tasks.encode import EncodedTask

    seen = []
    monkeypatch.setattr(ss, "score_task", lambda scorer, encoded, metric, stop, labels, split, budget, *reading:
                        seen.append((encoded.name, scorer.batch_size, budget)) or {"score": 0.0, "n": 0})
    scorer = Scorer(model=torch.nn.Linear(1, 1), pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=None,
                    batch_size=64, cfg=EvalConfig(), decode=str)
    tasks = [Task("a", "exact_match", [], [], [], eval_batch_size=4, max_new_tokens=9), Task("b", "exact_match",
                                                                                             [], [], [])]
    encoded = [EncodedTask(t.name, [], [], [], None) for t in tasks]
    ss.SequenceScorer(scorer, tasks, encoded, Strategy(), SimpleNamespace()).score()
    assert seen == [("a", 4, 9), ("b", 64, None)]
    assert scorer.batch_size == 64  # the sequence-wide scorer is left as it was
