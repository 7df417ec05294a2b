"""The model a run leaves (``save``): a directory transformers loads (``from_pretrained``) that scores what the run
reported; peft adapter directories for adapter strategies; written whole or not at all; refused strategies say why."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_config, run_quietly
from tiny_lm import one_thread, tiny_context, tiny_model  # noqa: F401 (autouse fixture)
from tiny_t5 import tiny_t5

from cl_runner.core.dist import World
from cl_runner.core.files import tree_bytes, write_dir_atomic
from cl_runner.engine.assembly import build_parts, sequence_scorer
from cl_runner.engine.takeaway import MANIFEST, base_state, full_state_dict, save_model
from cl_runner.strategies.base import Strategy
from cl_runner.strategies.prompts import PromptTuning


# ------------------------------------------------------------------------------------------- unit: no run
class _Tokenizer:
    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / "tokenizer_config.json").write_text("{}")


def _parts(model: torch.nn.Module, run_dir: Path, strategy: Strategy | None = None) -> SimpleNamespace:
    cfg = SimpleNamespace(strategy=SimpleNamespace(name="naive"), model=SimpleNamespace(name_or_path=None))
    return SimpleNamespace(model=model, strategy=strategy or Strategy(), ctx=tiny_context(model), run_dir=run_dir,
                           tokenizer=_Tokenizer(), cfg=cfg)


@pytest.mark.parametrize("make, auto", [(tiny_model, "AutoModelForCausalLM"), (tiny_t5, "AutoModelForSeq2SeqLM")])
def test_a_plain_model_reloads_with_its_auto_class_bit_for_bit(make, auto, tmp_path):
    import transformers

    model = make()
    saved = save_model(_parts(model, tmp_path), tmp_path / "model", "after_t2", stop_ids=[3])
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "model")
    assert saved == {"path": "model", "bytes": tree_bytes(tmp_path / "model")}
    assert type(loaded) is type(model)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((tmp_path / "model" / MANIFEST).read_text())["adapters"] is None
    assert 3 in loaded.generation_config.eos_token_id  # the end-of-turn stops HF generate too
    assert model.generation_config.eos_token_id != loaded.generation_config.eos_token_id  # the model's own kept


def test_a_strategy_whose_modules_only_cl_runner_runs_saves_nothing_and_says_why(tmp_path):
    saved = save_model(_parts(tiny_model(), tmp_path, PromptTuning(None)), tmp_path / "model", "after_t2", [])
    assert saved["path"] is None and "soft prompts" in saved["refused"] and "\n" not in saved["refused"]
    assert not (tmp_path / "model").exists()


def test_a_failed_write_leaves_the_previous_directory_and_no_half_one(tmp_path):
    target = tmp_path / "model"
    write_dir_atomic(target, lambda d: (d / "config.json").write_text("old"))

    def crash(d: Path) -> None:
        (d / "config.json").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomic(target, crash)
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left behind
    write_dir_atomic(target, lambda d: (d / "config.json").write_text("new"))
    assert (target / "config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_gathered_state_is_the_models_own_on_one_process_and_the_base_drops_the_adapters():
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model

    model = tiny_model()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["c_attn"]), model, adapter_name="task0")
    state = full_state_dict(model, World())
    assert any(".lora_A.task0." in k for k in state)
    base = base_state(state)
    assert base.keys() == plain.keys() and all(torch.equal(base[k], plain[k]) for k in plain)
    assert full_state_dict(model, World(rank=1, size=2, kind="ddp")) is None  # only rank 0 holds it


# ------------------------------------------------------------------------------------------- one real run
@pytest.fixture(scope="module")
def adapters_run(tmp_path_factory) -> tuple:
    cfg = make_config("strategy=adapters", "train.epochs=1", "save.every_task=true")
    run_dir = tmp_path_factory.mktemp("takeaway") / "run"
    return cfg, run_dir, run_quietly(cfg, run_dir)


@pytest.mark.slow
def test_the_saved_base_and_each_tasks_adapter_score_the_runs_last_row(adapters_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, run_dir, metrics = adapters_run
    saved = run_dir / "model"
    manifest = json.loads((saved / MANIFEST).read_text())
    parts = build_parts(cfg, tmp_path, None)  # the same tasks, encoded as the run encoded them
    assert AutoTokenizer.from_pretrained(saved).get_vocab() == parts.tokenizer.get_vocab()
    scoring = replace(sequence_scorer(parts), strategy=Strategy())  # plain scoring: the adapter comes from disk
    last = metrics["stages"][-1]["scores"]
    for j, name in enumerate(parts.names):
        (adapter,) = manifest["adapters"][name]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved), saved / "adapters" / adapter)
        scoring.scorer = replace(scoring.scorer, model=model.eval())
        assert scoring.score(indices=[j])[0]["score"] == last[name]["score"], name
    assert metrics["saved_model"] == {"path": "model", "bytes": tree_bytes(saved), "adapters": manifest["adapters"]}


@pytest.mark.slow
def test_every_task_but_the_last_leaves_its_own_directory(adapters_run):
    cfg, run_dir, metrics = adapters_run
    names = [t.name for t in cfg.tasks.tasks]
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == sorted(f"after_{n}" for n in names[:-1])
    for k, name in enumerate(names[:-1]):
        directory = run_dir / "models" / f"after_{name}"
        manifest = json.loads((directory / MANIFEST).read_text())
        assert manifest["stage"] == f"after_{name}"
        assert sorted(p.name for p in (directory / "adapters").iterdir()) == [f"task{t}" for t in range(k + 1)]
        assert metrics["saved_models"][f"after_{name}"]["bytes"] == tree_bytes(directory)
    left = [p.name for d in (run_dir, run_dir / "models") for p in d.iterdir() if p.name.endswith((".tmp", ".old"))]
    assert not left  # no temporary directory left
