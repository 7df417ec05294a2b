"""Bad inputs found where they are first read, each named by key, file and line: data files (before ``datasets``
sees them), model directories (before transformers loads them), numbers and ``model.arch`` (at validation), and
strategy options that name parameters or modules (the ``check`` hook, before any evaluation). The CLI side of
every case (exit 2, one line) is in tests/cli/test_bad_inputs.py."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bad_files import GOOD, write_data_files, write_model_dirs
from helpers import make_config
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.config.schema import ModelConfig, TaskConfig
from cl_runner.core.checks import arch_errors, check_fraction, check_positive
from cl_runner.core.errors import ConfigError, DataError, ModelError
from cl_runner.engine.assembly import build_parts
from cl_runner.models.kinds import CAUSAL_LM
from cl_runner.models.load import _quiet_load, load_model, load_tokenizer
from cl_runner.strategies.adapters import Adapters, AdaptersConfig
from cl_runner.strategies.common import selected_parameters
from cl_runner.strategies.ewc import EWC, EWCConfig
from cl_runner.strategies.ewc_replay import EWCReplay, EWCReplayConfig
from cl_runner.strategies.lora import add_lora
from cl_runner.tasks.load import _load_error, load_task

KEY = "tasks.tasks.0"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    write_data_files(root)
    return root


def load(root: Path, name: str, builder: str = "json"):
    cfg = TaskConfig(name="t", path=builder, data_files={"train": name, "test": name}, input_column="question",
                     target_column="answer")
    return load_task(cfg, 0, root, KEY)


# ----------------------------------------------------------------------------------------------- data files
@pytest.mark.parametrize(("name", "builder", "message"), [
    ("latin1.jsonl", "json", "latin1.jsonl line 3 is not UTF-8 text (byte 0xe9 at position 18 of the line)"),
    ("latin1.csv", "csv", "latin1.csv line 3 is not UTF-8 text (byte 0xe9 at position 4 of the line)"),
    ("blank_lines.jsonl", "json", "blank_lines.jsonl has no rows (only blank lines)"),
    ("header_only.csv", "csv", "header_only.csv has a header (line 1) but no rows"),
    ("ragged.csv", "csv", "ragged.csv line 3 has 3 fields, the header (line 1) has 2"),
    ("list_line.jsonl", "json", "list_line.jsonl line 3 is not a JSON object but a list"),
    ("string_line.jsonl", "json", "string_line.jsonl line 3 is not a JSON object but a string"),
    ("number_line1.jsonl", "json", "number_line1.jsonl line 1 is not a JSON object but a number"),
    ("long_line.jsonl", "json", "long_line.jsonl line 3 is longer than 10 MiB"),
])
def test_a_bad_data_file_is_named_with_its_line(files, name, builder, message):
    with pytest.raises(DataError) as info:
        load(files, name, builder)
    assert str(info.value).startswith(f"{KEY}.data_files: {files / name}")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_what_the_checks_read_still_loads(tmp_path):
    """A BOM, blank lines, a JSON document in a .json file, JSON lines in a .json file, a CSV row with fewer
    fields than the header and a quoted field over two lines are all data ``datasets`` reads."""
    lines = "".join(f'{{"question": "{r["question"]}", "answer": "{r["answer"]}"}}\n\n' for r in GOOD)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "lines.json").write_text(lines)
    (tmp_path / "doc.json").write_text(json.dumps(GOOD, indent=2))
    (tmp_path / "short.csv").write_text('question,answer,note\n"two\nlines",a1,x\nq2,a2\n')
    for name in ("bom.jsonl", "lines.json", "doc.json"):
        assert len(load(tmp_path, name).test) == 2, name
    assert [e.target for e in load(tmp_path, "short.csv", "csv").test] == [" a1", " a2"]
    assert load(tmp_path, "short.csv", "csv").test[0].prompt.startswith("two\nlines")


def test_a_ragged_row_after_a_quoted_newline_is_named_by_its_physical_line(tmp_path):
    (tmp_path / "quoted.csv").write_text('question,answer\n"two\nlines",a1\nq2,a2,a3\n')
    with pytest.raises(DataError, match="quoted.csv line 4 has 3 fields"):
        load(tmp_path, "quoted.csv", "csv")


def test_a_datasets_error_keeps_the_first_line_of_its_cause():
    try:
        try:
            raise ValueError("Expected 2 fields in line 3, saw 3\nmore")
        except ValueError as cause:
            raise RuntimeError("An error occurred while generating the dataset") from cause
    except RuntimeError as exc:
        assert _load_error(exc) == ("An error occurred while generating the dataset "
                                    "(ValueError: Expected 2 fields in line 3, saw 3)")


# ----------------------------------------------------------------------------------------------- model directories
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_model_dirs(root)
    return root


@pytest.mark.parametrize(("name", "message"), [
    ("model-truncated", "model-truncated/model.safetensors is damaged or truncated (Error while deserializing"),
    ("model-garbage", "model-garbage/model.safetensors is damaged or truncated"),
    ("model-shapes", "do not fit its config.json (transformer.h.0.attn.c_attn.bias is [48] in model.safetensors but "
                     "[96] by config.json)"),
    ("model-bad-config", "model-bad-config/config.json is not valid JSON (line 1, column "),
    ("model-bad-tokenizer", "model-bad-tokenizer/tokenizer.json is not valid JSON (line 1, column 20: Unterminated"),
])
def test_a_damaged_model_directory_names_the_file(models, name, message):
    cfg = ModelConfig(name_or_path=str(models / name))
    with pytest.raises(ModelError) as info:
        load_model(cfg, load_tokenizer(cfg, []), seed=0)
    assert str(info.value).startswith("model.name_or_path: ") and message in str(info.value)


def test_a_good_model_directory_still_loads(models):
    cfg = ModelConfig(name_or_path=str(models / "model-ok"))
    assert isinstance(load_model(cfg, load_tokenizer(cfg, []), seed=0), GPT2LMHeadModel)


def test_the_load_report_is_passed_on_after_a_load_and_dropped_after_a_failure(caplog):
    logger = logging.getLogger("transformers.modeling_utils")
    with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"):
        with _quiet_load():
            logger.warning("report of a load that worked")
            assert "report of a load that worked" not in caplog.text  # held until the load is over
        with pytest.raises(RuntimeError), _quiet_load():
            logger.warning("report of a load that failed")
            raise RuntimeError("size mismatch")
    assert "report of a load that worked" in caplog.text
    assert "report of a load that failed" not in caplog.text
    assert logger.filters == []


# ----------------------------------------------------------------------------------------------- numbers, model.arch
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_fail_every_numeric_check(value):
    errs: list[str] = []
    check_positive(errs, "a", value)
    check_positive(errs, "b", value, allow_zero=True)
    check_fraction(errs, "c", value)
    check_fraction(errs, "d", value, closed_right=False)
    assert [e.split(":")[0] for e in errs] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(("arch", "message"), [
    ({"n_layers": 6}, "model.arch.n_layers: not an option of GPT2Config (gpt2); did you mean 'n_layer'?"),
    ({"n_layer": -1}, "model.arch.n_layer: expected a positive integer (a size or count), got -1"),
    ({"hidden_size": 0}, "model.arch.hidden_size: expected a positive integer"),  # an alias of n_embd
    ({"n_layer": "two"}, "model.arch: GPT2Config rejects these values"),
    ({"resid_pdrop": math.nan}, "model.arch.resid_pdrop: expected a finite number, got nan"),
])
def test_model_arch_is_checked_against_the_config_class(arch, message):
    assert message in "; ".join(arch_errors({"model_type": "gpt2", **arch}, "model.arch"))


def test_a_valid_model_arch_passes():
    assert arch_errors({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256,
                        "resid_pdrop": 0.0, "tie_word_embeddings": True}, "model.arch") == []
    assert arch_errors({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                        "intermediate_size": 128}, "model.arch") == []


# ----------------------------------------------------------------------------------------------- strategy.check
def tiny_context():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50))
    return SimpleNamespace(model=model, kind=CAUSAL_LM)


@pytest.mark.parametrize("strategy", [EWC(EWCConfig(penalised_params="nomatch")),
                                      EWCReplay(EWCReplayConfig(penalised_params="nomatch"))])
def test_penalised_params_matching_nothing_fails_the_check(strategy):
    with pytest.raises(ConfigError, match=r"^strategy.penalised_params: 'nomatch' matches no trainable parameter name"):
        strategy.check(tiny_context())


def test_penalised_params_matching_a_trainable_parameter_pass_the_check_and_are_the_parameters_penalised():
    """What passes the check is what ``after_task`` penalises (``selected_parameters``): a match anywhere in the
    name (``re.search``), and trainable parameters only, so a pattern that only matches frozen ones is refused."""
    ctx = tiny_context()
    names = [n for n, _ in ctx.model.named_parameters()]
    mlp = [n for n in names if ".mlp." in n]
    for pattern, penalised in ((r"\.mlp\.", mlp), ("c_fc", mlp[:2]), (None, names)):
        EWC(EWCConfig(penalised_params=pattern)).check(ctx)
        assert [n for n, _ in selected_parameters(ctx.model, pattern)] == penalised and penalised, pattern
    ctx.model.transformer.wte.weight.requires_grad_(False)
    EWC(EWCConfig(penalised_params="wpe")).check(ctx)
    with pytest.raises(ConfigError, match=r"^strategy.penalised_params: 'wte' matches no trainable parameter name"):
        EWC(EWCConfig(penalised_params="wte")).check(ctx)


@pytest.mark.parametrize(("targets", "message"), [
    (["nope"], "'nope' matches no module"),
    (["c_attn", "c_atn"], "'c_atn' matches no module; did you mean 'c_attn'?"),
    (["ln_f"], "'ln_f' is a LayerNorm, which LoRA cannot adapt"),
])
def test_target_modules_are_checked_before_any_adapter_is_added(targets, message):
    ctx = tiny_context()
    names = [n for n, _ in ctx.model.named_parameters()]
    with pytest.raises(ConfigError, match=f"^strategy.target_modules: {message}"):
        Adapters(AdaptersConfig(target_modules=targets)).check(ctx)
    assert [n for n, _ in ctx.model.named_parameters()] == names  # the check only looks


@pytest.mark.parametrize(("targets", "adapted"), [
    (["c_attn", "transformer.h.0.mlp.c_fc"], ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]),
    (None, ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj"]),  # null: every linear layer but the output layer
])
def test_target_modules_naming_layers_pass_the_check_and_are_the_layers_adapted(targets, adapted):
    """A name passes the check when peft adapts it: the full name or its last components."""
    from peft.tuners.lora import LoraLayer

    ctx = tiny_context()
    strategy = Adapters(AdaptersConfig(target_modules=targets))
    strategy.check(ctx)
    add_lora(ctx.model, "t0", strategy.cfg, seed=0, device=torch.device("cpu"))
    assert sorted(n for n, m in ctx.model.named_modules() if isinstance(m, LoraLayer)) == adapted


@pytest.mark.parametrize("overrides", [("strategy=ewc", "strategy.penalised_params=nomatch"),
                                       ("strategy=adapters", "strategy.target_modules=[nope]")])
def test_the_run_checks_the_strategy_as_soon_as_the_model_is_built(overrides, tmp_path):
    """Not after the initial evaluation, nor after the first task: ``build_parts`` raises."""
    with pytest.raises(ConfigError, match=f"^{overrides[1].split('=')[0]}: "):
        build_parts(make_config(*overrides), tmp_path, tmp_path)


def test_an_unknown_key_suggests_the_nearest_option_of_its_own_schema_and_only_a_near_one():
    from cl_runner.config.schema import Config, TrainConfig
    from cl_runner.config.validate import unknown_key
    from cl_runner.strategies.replay import ReplayConfig

    assert unknown_key("train.epoch", TrainConfig) == ("train.epoch: unknown key; did you mean train.epochs? "
                                                       "(see docs/configuration.md)")
    assert "did you mean strategy.buffer_size?" in unknown_key("strategy.buffer_sise", ReplayConfig)
    assert "did you mean train?" in unknown_key("trian", Config)
    assert unknown_key("train.bogus", TrainConfig) == "train.bogus: unknown key (see docs/configuration.md)"
    assert unknown_key("strategy.buffer_sise", None) == "strategy.buffer_sise: unknown key (see docs/configuration.md)"
