"""Whole runs in-process: the known forgetting case, determinism, local models and local data via datasets, the
matrix CSV at full precision, logged strategy values in history.jsonl."""

import csv
import json

import pytest
from helpers import LOCAL_SEQUENCE, make_config, run_quietly, write_jsonl, write_local_sequence
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from cl_runner.core.errors import DataError, ModelError
from cl_runner.engine import assembly
from cl_runner.models.load import train_tokenizer
from cl_runner.scoring import cl_metrics
from cl_runner.strategies.base import Strategy


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """naive and joint on the default sequence with the default training settings (same seed)."""
    out = {}
    for name in ("naive", "joint"):
        cfg = make_config(f"strategy={name}", "device=cpu", small=False)
        out[name] = run_quietly(cfg, tmp_path_factory.mktemp(name))
    return out


@pytest.mark.slow
def test_naive_forgets_and_joint_does_not(default_runs):
    naive, joint = default_runs["naive"], default_runs["joint"]
    # naive learns each task when it trains it, then loses the earlier ones; joint keeps them
    assert min(t["just_trained"] for t in naive["per_task"]) >= 0.8
    assert naive["average_forgetting"] >= 0.6
    assert joint["average_forgetting"] <= 0.1
    assert joint["average_accuracy"] >= naive["average_accuracy"] + 0.4


@pytest.mark.slow
def test_same_seed_gives_the_same_matrix(tmp_path):
    first = run_quietly(make_config("seed=3"), tmp_path / "a")
    second = run_quietly(make_config("seed=3"), tmp_path / "b")
    assert [s["scores"] for s in first["stages"]] == [s["scores"] for s in second["stages"]]
    assert (tmp_path / "a" / "accuracy_matrix.csv").read_text() == (tmp_path / "b" / "accuracy_matrix.csv").read_text()


@pytest.mark.slow
def test_local_jsonl_sequence_loads_through_datasets(tmp_path):
    write_local_sequence(tmp_path)
    cfg = make_config("tasks.name=local", "train.epochs=10", tasks=LOCAL_SEQUENCE)
    result = run_quietly(cfg, tmp_path / "run", base_dir=tmp_path)  # relative paths: from the launch dir
    assert result["tasks"] == ["sentiment", "qa", "wiki"]
    assert result["metric_per_task"] == ["label_accuracy", "exact_match", "perplexity"]
    before, after = result["stages"][-2]["scores"], result["stages"][-1]["scores"]
    assert after["wiki"]["score"] < before["wiki"]["score"] / 2  # training on the text lowers its perplexity
    assert result["examples"]["qa"]["train"] + result["examples"]["qa"]["validation"] == 12


@pytest.mark.slow
def test_label_outside_verbalizer_is_a_data_error(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 7}])
    cfg = make_config(tasks=[{"name": "s", "path": "json", "data_files": {"train": "s.jsonl", "test": "s.jsonl"},
                              "input_column": "text", "target_column": "label",
                              "verbalizer": {"0": "no", "1": "yes"}, "metric": "label_accuracy"}])
    with pytest.raises(DataError, match=r"tasks.tasks.0.verbalizer: .* has label '7', not one of 0, 1"):
        run_quietly(cfg, tmp_path / "run", base_dir=tmp_path)


@pytest.mark.slow
def test_local_hugging_face_model_directory_loads_and_trains(tmp_path):
    tok = train_tokenizer(["What is the favourite colour of Zed? red blue"] * 10, vocab_size=400)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok),
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    model_dir = tmp_path / "my-lm"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = make_config(f"model.name_or_path={model_dir}", "train.epochs=1", "train.max_length=128")
    result = run_quietly(cfg, tmp_path / "run")
    assert result["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert result["status"] == "completed"
    assert isinstance(AutoModelForCausalLM.from_pretrained(model_dir), GPT2LMHeadModel)


@pytest.mark.slow
def test_directory_without_tokenizer_is_a_model_error(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path / "no-tok")
    with pytest.raises(ModelError, match="model.name_or_path: no tokenizer files in"):
        run_quietly(make_config(f"model.name_or_path={tmp_path / 'no-tok'}"), tmp_path / "run")


class LoggingStrategy(Strategy):
    """Plain fine-tuning that logs a tensor in ``loss`` and a float in ``after_step``."""

    def loss(self, ctx, batch, outputs, loss):
        ctx.log(logged_loss=loss.detach())
        return loss

    def after_step(self, ctx):
        ctx.log(logged_step=float(ctx.step))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """The local sequence (perplexity included: scores with many digits) trained by ``LoggingStrategy``."""
    root = tmp_path_factory.mktemp("logged")
    write_local_sequence(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assembly, "build_strategy", LoggingStrategy)
        result = run_quietly(make_config("tasks.name=local", tasks=LOCAL_SEQUENCE), root / "run", base_dir=root)
    return result, root / "run"


@pytest.mark.slow
def test_matrix_csv_recomputes_the_summary_exactly(logged_run):
    result, run_dir = logged_run
    with open(run_dir / "accuracy_matrix.csv") as handle:
        rows = [[float(v) for v in row[1:]] for row in list(csv.reader(handle))[1:]]
    assert rows == [[s["scores"][n]["score"] for n in result["tasks"]] for s in result["stages"]]
    higher = [m != "perplexity" for m in result["metric_per_task"]]
    summary = cl_metrics.summarize(rows[1:], rows[0], higher, result["tasks"])
    assert summary == {key: result[key] for key in summary}


@pytest.mark.slow
def test_logged_values_reach_history(logged_run):
    result, run_dir = logged_run
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3 * 2
    for record in history:
        assert set(record["extras"]) == {"logged_loss", "logged_step"}
        assert record["extras"]["logged_step"] == record["step"]
        assert isinstance(record["extras"]["logged_loss"], float)
