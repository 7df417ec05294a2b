"""Honest output: the saved config holds only what the run uses, trainable parameters are what the optimizer
updates, task names are never cut in a console written to a file, and tokens per second say what they count."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from tiny_lm import one_thread, task_examples, tiny_context, tiny_model  # noqa: F401 (autouse fixture)

from cl_runner.cli import CONF_DIR
from cl_runner.config.schema import Config, TrainConfig, as_dict, used_config
from cl_runner.config.validate import register_configs, validate
from cl_runner.engine.claim import RunHooks, claim
from cl_runner.engine.loop import make_optimizer
from cl_runner.models.lm import token_counts
from cl_runner.models.load import parameter_count, train_tokenizer, trainable_count
from cl_runner.outputs.results import print_summary
from cl_runner.strategies.adapters import Adapters, AdaptersConfig
from cl_runner.strategies.lora import lora_parameters

register_configs()


def composed(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["device=cpu", *overrides])


# ------------------------------------------------------------------------------ model.arch with a pretrained model
def test_a_pretrained_model_saves_no_architecture_and_a_built_one_keeps_it():
    cfg = composed("model.name_or_path=/models/mine")  # model=tiny (the default) brings an arch block
    assert cfg.model.arch.n_layer == 2
    saved = OmegaConf.to_yaml(used_config(cfg), resolve=True)
    assert "arch: {}" in saved and "n_layer" not in saved and "model_type" not in saved
    assert cfg.model.arch.n_layer == 2  # the composed config itself is left as it is
    assert as_dict(validate(cfg))["model"]["arch"] == {}  # metrics.json's config
    built = composed()
    assert used_config(built) is built and validate(built).model.arch["n_layer"] == 2


def test_a_saved_pretrained_config_still_matches_on_rerun_and_resume(tmp_path):
    overrides = ("model.name_or_path=/models/mine", "train.lr=1e-4")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(used_config(composed(*overrides)), resolve=True))
    rerun = OmegaConf.to_yaml(used_config(composed(*overrides)), resolve=True)
    assert claim(tmp_path, rerun, None, RunHooks()) is True  # the same experiment: continued, not refused
    resumed = validate(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(tmp_path / "config.yaml")))
    assert as_dict(resumed) == as_dict(validate(composed(*overrides)))  # cl-run resume=DIR: no key looks edited


@pytest.mark.slow
def test_a_run_on_a_local_pretrained_model_records_no_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer(["What is the favourite colour of Zed? red blue"] * 10, vocab_size=400)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok),
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(
        tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    cfg = composed(f"model.name_or_path={tmp_path / 'lm'}", "train.epochs=1", "train.max_length=128",
                   "train.keep_best=false", "checkpoint.enabled=false")
    from cl_runner.engine.run import run

    run(validate(cfg), tmp_path / "run", OmegaConf.to_yaml(used_config(cfg), resolve=True),
        console=Console(file=io.StringIO()))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["config"]["model"]["arch"] == {}
    assert "n_layer" not in (tmp_path / "run" / "config.yaml").read_text()


# ------------------------------------------------------------------------------ trainable parameters
def test_trainable_count_is_what_the_optimizer_updates_far_below_the_total_with_adapters():
    model = tiny_model()
    ctx = tiny_context(model)
    ctx.task_index = 0
    Adapters(AdaptersConfig()).before_task(ctx)  # adds the task's adapter and freezes everything else
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    updated = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert trainable_count(model) == updated == sum(p.numel() for _, p in lora_parameters(model, "task0"))
    assert 0 < 4 * trainable_count(model) < parameter_count(model)  # rank-8 LoRA of a 32-wide model: 22%


def test_parameters_over_one_storage_are_counted_once():
    model = tiny_model()
    n = parameter_count(model)
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.data)  # two Parameters, one storage
    assert parameter_count(model) == trainable_count(model) == n
    assert sum(p.numel() for p in model.parameters()) > n


# ------------------------------------------------------------------------------ console table in a file
def test_long_task_names_are_whole_in_a_console_written_to_a_file():
    names = [f"a_rather_long_task_name_number_{i}_topic_classification" for i in range(4)]
    rows = [[0.25] * 4 for _ in range(5)]
    accounting = {"trainable_parameters_per_task": {name: 1234 for name in names}}
    out = io.StringIO()
    print_summary(Console(file=out, width=80), names, rows, {"average_accuracy": 0.25,
                  "strategy_accounting": accounting}, ["exact_match"] * 4, Path("run"))
    text = out.getvalue()
    assert "…" not in text
    assert all(name in text and f"after_{name}" in text for name in names)
    assert str(accounting["trainable_parameters_per_task"]) in text


def test_the_summary_says_each_count_once_and_in_human_units_only():
    accounting = {"base_parameters_frozen": 134_515_008, "adapters": 2, "trainable_parameters": 921_600,
                  "extra_parameters": 1_843_200, "extra_bytes": 7_372_800, "agem_projected_steps": 12}
    cost = {"trainable_parameters": 921_600, "extra_parameters": 1_843_200, "peak_cpu_rss_bytes": 2_500_000_000}
    out = io.StringIO()
    print_summary(Console(file=out, width=120), ["a"], [[0.1], [0.5]],
                  {"strategy_accounting": accounting, "cost": cost}, ["exact_match"], Path("run"))
    lines = out.getvalue().splitlines()
    assert sum("trainable parameters" in line for line in lines) == 1  # the cost row's, not again from accounting
    assert sum("extra parameters" in line for line in lines) == 1
    assert any("921.6k" in line for line in lines) and any("1.8M" in line for line in lines)
    assert any("extra bytes" in line and "7.4 MB" in line for line in lines)
    assert any("base parameters frozen" in line and "134.5M" in line for line in lines)
    assert any("peak memory" in line and "2.5 GB" in line for line in lines)
    for raw in ("921600", "1843200", "7372800", "134515008", "2500000000"):  # no raw count beside a human one
        assert raw not in out.getvalue()


# ------------------------------------------------------------------------------ tokens and target tokens
def test_token_counts_are_all_real_tokens_and_the_positions_the_loss_is_computed_on():
    examples = task_examples(0, n=3)  # 4 prompt tokens, then answer + EOS: 2 targets each
    assert token_counts(examples) == (3 * 6, 3 * 2)
    assert token_counts([]) == (0, 0)
