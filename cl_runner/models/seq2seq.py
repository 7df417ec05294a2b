"""Encoder-decoder models (T5, Flan-T5, BART): the same examples, loop and strategies as causal LMs.

Examples stay in the causal layout everywhere (``lm.Encoded``: prompt + target, ``-100`` on the prompt), so
tasks, replay buffers, checkpoints and the loop's target-token weighting are shared. Right before the model is
called, the model kind (``kinds.EncoderDecoder.model_batch``) turns a collated causal batch into the
encoder-decoder one (``encoder_decoder_batch``): the prompt (and EOS, as the models' own tokenizers end an input)
is the encoder input; the decoder reads ``[start] + target`` and its labels are ``[-100] + target``. That decoder
side *is* the causal convention of ``lm`` (position t predicts token t + 1, position 0 is never a target), so
``causal_lm_loss``, ``token_nll``, ``target_mask`` and every strategy that reads ``outputs.logits`` with
``batch["labels"]`` (LwF's distillation, DER's stored logits, the buffer's losses) work unchanged, and an example
has as many target tokens as in the causal layout (``lm.target_count``).

Evaluation (``kinds.EncoderDecoder``): greedy generation runs the encoder once and the decoder from the start
token with its KV cache, stopping at EOS; label scoring runs the encoder once per prompt and scores every label on
the decoder with the encoder's output repeated (``encoder_outputs``); perplexity is the decoder's NLL of the
targets.

What is refused (``config_errors``, one line before anything loads): ``train.pack`` (rows of concatenated
examples would need block-diagonal cross-attention) and ``distributed=fsdp`` (not yet checked with the driver).
What each strategy cannot do on an encoder-decoder is declared on its class (``encoder_decoder`` in its
``supports``, cl_runner/strategies/support.py), checked with the same model kind (``config_is_encoder_decoder``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cl_runner.core.errors import ConfigError
from cl_runner.models.lm import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")  # forward's inputs
ENCODER_KEYS = ("input_ids", "attention_mask")


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the Hugging Face model inside a wrapper) is an encoder-decoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_start(model: torch.nn.Module) -> int:
    """The token the decoder starts from: the model config's, else its generation config's (T5: pad, BART: EOS)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ConfigError("model.name_or_path: the encoder-decoder's config sets no decoder_start_token_id")
    return start


def encoder_decoder_batch(batch: dict[str, torch.Tensor], start_id: int, pad_id: int,
                          eos_id: int) -> dict[str, torch.Tensor]:
    """A collated causal batch split into encoder input (prompt + EOS) and decoder input and labels."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    is_target = labels != IGNORE_INDEX
    targets = is_target.sum(1)
    prompt = mask.sum(1) - targets  # real tokens that are not targets; targets follow the prompt
    columns = torch.arange(ids.size(1) + 1, device=ids.device)
    enc_len, dec_len = ids.size(1) + 1, ids.size(1)  # bounds; model_batch cuts them to the longest row
    enc_mask = columns[None, :enc_len] <= prompt[:, None]
    enc_ids = torch.cat([ids, torch.full_like(ids[:, :1], pad_id)], 1).masked_fill(~enc_mask, pad_id)
    enc_ids = enc_ids.scatter(1, prompt[:, None], eos_id)
    where = (prompt[:, None] + columns[None, :dec_len]).clamp_max(ids.size(1) - 1)
    valid = columns[None, :dec_len] < targets[:, None]
    first = torch.ones_like(valid[:, :1])
    dec_ids = torch.cat([first * start_id, ids.gather(1, where).masked_fill(~valid, pad_id)], 1)
    dec_labels = torch.cat([first * IGNORE_INDEX, labels.gather(1, where).masked_fill(~valid, IGNORE_INDEX)], 1)
    out = {"input_ids": enc_ids, "attention_mask": enc_mask.long(), "decoder_input_ids": dec_ids,
           "decoder_attention_mask": torch.cat([first, valid], 1).long(), "labels": dec_labels}
    return out | {k: v for k, v in batch.items() if k not in out}


def config_errors(cfg: Any) -> list[str]:
    """One line per setting other than the strategy that an encoder-decoder ``cfg.model`` cannot run with (empty
    for a causal LM); the strategy's own refusals are its class's (cl_runner/strategies/support.py)."""
    if not config_is_encoder_decoder(cfg.model):
        return []
    errs = []
    if cfg.train.pack:
        errs.append("train.pack: not supported with an encoder-decoder model (packed rows would need "
                    "block-diagonal cross-attention); set train.pack=false")
    if cfg.distributed.kind == "fsdp":
        errs.append("distributed.kind: fsdp is not supported with an encoder-decoder model yet (its T5Block "
                    "wrapping is unchecked); use ddp or none")
    return errs


def config_is_encoder_decoder(model_cfg: Any) -> bool:
    """Whether ``model.*`` names an encoder-decoder, read without loading weights: ``arch``'s config class,
    a local directory's config.json, or a hub id's config in the Hugging Face cache (never the network: False
    when it is not there, and ``Strategy.check`` refuses a strategy once the model is loaded)."""
    if model_cfg.name_or_path is None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = model_cfg.arch.get("model_type")
        return model_type in CONFIG_MAPPING and bool(CONFIG_MAPPING[model_type]().is_encoder_decoder)
    local = Path(model_cfg.name_or_path).expanduser() / "config.json"
    try:
        if local.is_file():
            return bool(json.loads(local.read_text(encoding="utf-8")).get("is_encoder_decoder", False))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code, local_files_only=True)
        return bool(config.is_encoder_decoder)
    except Exception:  # an unreadable config is the loader's error to report
        return False
