"""The model-kind seam (cl_runner/models/kinds.py): the kind is chosen from the model once (causal LM or
encoder-decoder, with the encoder-decoder's ids), its host-side token count agrees with the batch it lays out,
packing is the causal kind's alone, and no module outside the seam asks a model's config what kind it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_lm import EOS, task_examples, tiny_model
from tiny_t5 import tiny_t5

from cl_runner.core.errors import ConfigError
from cl_runner.models.kinds import CAUSAL_LM, CausalLM, EncoderDecoder, kind_of
from cl_runner.models.lm import collate, pack
from cl_runner.models.load import auto_class
from cl_runner.scoring.evaluate import Scorer
from cl_runner.strategies.base import Context

PACKAGE = Path(__file__).resolve().parents[2] / "cl_runner"
SEAM = {"models/kinds.py", "models/seq2seq.py"}


def test_the_kind_is_read_from_the_model_with_the_encoder_decoders_ids():
    assert kind_of(tiny_model()) == CausalLM() == CAUSAL_LM
    assert kind_of(torch.nn.Linear(1, 1)) == CAUSAL_LM  # no config: a plain module reads causal batches
    t5 = tiny_t5()
    assert kind_of(t5) == EncoderDecoder(start_id=t5.config.decoder_start_token_id, pad_id=t5.config.pad_token_id,
                                         eos_id=t5.config.eos_token_id)
    assert auto_class(t5.config).__name__ == "AutoModelForSeq2SeqLM"
    assert auto_class(tiny_model().config).__name__ == "AutoModelForCausalLM"
    fields = {"model": None, "device": None, "autocast": None}  # a context or scorer made without a kind: causal
    assert Context(**fields, collate=None, task_names=[], train_sets=[]).kind == CAUSAL_LM
    assert Scorer(**fields, pad_id=0, eos_id=0, batch_size=1, cfg=None, decode=None).kind == CAUSAL_LM


@pytest.mark.parametrize("make", [tiny_model, tiny_t5])
def test_the_tokens_counted_on_the_host_are_the_real_positions_of_the_batch_the_model_reads(make):
    model = make()
    kind, data = kind_of(model), task_examples(0, 5) + task_examples(1, 3)
    data[2] = {**data[2], "input_ids": data[2]["input_ids"][1:], "labels": data[2]["labels"][1:]}  # ragged
    batch, inputs = kind.training_batch(data, lambda rows: collate(rows, EOS))
    masks = [mask for _, mask in kind.hidden_states(model(**inputs, output_hidden_states=True), batch)]
    assert sum(m.sum(1) for m in masks).tolist() == [kind.model_tokens(e) for e in data]
    assert all(m.size(1) == m.sum(1).max() for m in masks)  # cut to the longest row: no column of padding only


def test_packed_rows_are_the_causal_kinds_and_an_encoder_decoder_refuses_them_in_one_line():
    data = task_examples(0, 6)
    batch, inputs = CAUSAL_LM.training_batch(data, lambda rows: collate(rows, EOS), pack_length=20)
    assert torch.equal(batch["input_ids"], pack(data, 20, lambda rows: collate(rows, EOS))["input_ids"])
    assert inputs["attention_mask"] is None and torch.equal(inputs["position_ids"], batch["position_ids"])
    with pytest.raises(ConfigError, match=r"^train.pack: not supported with encoder-decoder models; set "
                                          r"train.pack=false$"):
        kind_of(tiny_t5()).training_batch(data, lambda rows: collate(rows, EOS), pack_length=20)


def test_no_module_outside_the_seam_asks_a_models_config_for_its_kind():
    asking = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
              if re.search(r"\bis_encoder_decoder\b", p.read_text(encoding="utf-8"))}
    assert asking <= SEAM, f"ask the model's kind (models/kinds.py) instead: {sorted(asking - SEAM)}"
