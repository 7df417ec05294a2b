"""Encoder-decoder models (T5, Flan-T5, BART): the same examples, loop and strategies as causal LMs.

Examples stay in the causal layout everywhere (``lm.Encoded``: prompt + target, ``-100`` on the prompt), so
tasks, replay buffers, checkpoints and the loop's target-token weighting are shared. Right before the model is
called, ``model_batch`` turns a collated causal batch into the encoder-decoder one: the prompt (and EOS, as the
models' own tokenizers end an input) is the encoder input; the decoder reads ``[start] + target`` and its labels
are ``[-100] + target``. That decoder side *is* the causal convention of ``lm`` (position t predicts token
t + 1, position 0 is never a target), so ``causal_lm_loss``, ``token_nll``, ``target_mask`` and every strategy
that reads ``outputs.logits`` with ``batch["labels"]`` (LwF's distillation) work unchanged, and an example has
as many target tokens as in the causal layout (``lm.target_count``).

Evaluation: greedy generation runs the encoder once and the decoder from the start token with its KV cache,
stopping at EOS; label scoring runs the encoder once per prompt and scores every label on the decoder with the
encoder's output repeated (``encoder_outputs``); perplexity is the decoder's NLL of the targets.

What is refused (``config_errors``, one line before anything loads): ``train.pack`` (rows of concatenated
examples would need block-diagonal cross-attention), strategies ``lamol`` (it generates whole examples as one
sequence), ``progressive`` (its columns adapt one stack of blocks), those that run the model on causal batches
themselves or hook the shared input embeddings (``REFUSED_STRATEGIES``), ``fisher: sampled`` (it samples labels in
the causal layout), replay buffer sampling by loss (``importance``/``hardest``: ``strategies/buffer.py`` calls
the model without decoder inputs) and ``distributed=fsdp`` (not yet checked with the driver).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cl_runner.core.errors import ConfigError
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import IGNORE_INDEX, Encoded, collate, target_count

MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
ENCODER_KEYS = ("input_ids", "attention_mask")
TRIMMED = (*MODEL_INPUTS, "labels")
REFUSED_STRATEGIES = {
    "lamol": "it generates whole examples (prompt and answer) as one sequence, which a decoder does not read",
    "progressive": "its columns adapt one stack of transformer blocks (a decoder-only model's); an encoder-decoder "
                   "has two",
    **dict.fromkeys(("der", "agem", "gem", "ilora"), "it runs the model on causal-layout batches (no decoder inputs)"),
    "ogd": "it runs the model on causal-layout batches (no decoder inputs)",
    "l2p": "its soft prompts hook the input embeddings, which T5's encoder and decoder share",
    **dict.fromkeys(("prompt_tuning", "progressive_prompts"),
                    "its soft prompts hook the input embeddings, which T5's encoder and decoder share"),
}
REFUSED_SAMPLINGS = ("importance", "hardest")


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


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward that ``batch`` holds (labels and task ids are not passed)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def model_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                examples: list[Encoded] | None = None) -> dict[str, torch.Tensor]:
    """``batch`` (causal layout, right-padded) as ``model`` reads it: unchanged for a causal LM, the encoder and
    decoder tensors for an encoder-decoder (module docstring). With the batch's ``examples`` the lengths are
    counted on the host (no device sync: the training loop's case); without, read from the batch (one sync)."""
    if not is_encoder_decoder(model):
        return batch
    config = model.config
    out = encoder_decoder_batch(batch, decoder_start(model), config.pad_token_id, config.eos_token_id)
    if examples is not None:
        prompts = [len(e["input_ids"]) - target_count(e) for e in examples]
        enc, dec = max(prompts) + 1, max(target_count(e) for e in examples) + 1
    else:
        lengths = torch.stack([out["attention_mask"].sum(1).max(), out["decoder_attention_mask"].sum(1).max()])
        enc, dec = lengths.tolist()
    return {k: v[:, : enc if k in ENCODER_KEYS else dec] if k in TRIMMED else v for k, v in out.items()}


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
    """One line per option an encoder-decoder ``cfg.model`` cannot run with (empty for a causal LM)."""
    if not config_is_encoder_decoder(cfg.model):
        return []
    errs, name = [], cfg.strategy.name
    if cfg.train.pack:
        errs.append("train.pack: not supported with an encoder-decoder model (packed rows would need "
                    "block-diagonal cross-attention); set train.pack=false")
    if name in REFUSED_STRATEGIES:
        errs.append(strategy_refusal(name))
    if getattr(cfg.strategy, "fisher", None) == "sampled":
        errs.append("strategy.fisher: sampled is not supported with an encoder-decoder model (it samples labels "
                    "in the causal layout); use empirical")
    if getattr(cfg.strategy, "sampling", None) in REFUSED_SAMPLINGS:
        errs.append(f"strategy.sampling: {cfg.strategy.sampling} is not supported with an encoder-decoder model "
                    "(buffer losses are computed with a causal forward); use reservoir or random")
    if cfg.distributed.kind == "fsdp":
        errs.append("distributed.kind: fsdp is not supported with an encoder-decoder model yet (its T5Block "
                    "wrapping is unchecked); use ddp or none")
    return errs


def strategy_refusal(name: str) -> str:
    return f"strategy.name: {name} is not supported with an encoder-decoder model: {REFUSED_STRATEGIES[name]}"


def check_strategy(model: torch.nn.Module, name: str) -> None:
    """``Strategy.check``'s safety net for a model whose kind the config check could not read (a hub id not in
    the cache): raise the same one-line ``ConfigError`` once the model is loaded, before anything runs."""
    if name in REFUSED_STRATEGIES and is_encoder_decoder(model):
        raise ConfigError(strategy_refusal(name))


def config_is_encoder_decoder(model_cfg: Any) -> bool:
    """Whether ``model.*`` names an encoder-decoder, read without loading weights: ``arch``'s config class,
    a local directory's config.json, or a hub id's config in the Hugging Face cache (never the network: False
    when it is not there, and ``check_strategy`` refuses a strategy once the model is loaded)."""
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


def _encoder_input(scorer: Any, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts + EOS, right-padded, on the scorer's device: (ids, mask)."""
    rows = [{"input_ids": p + [scorer.eos_id], "labels": [IGNORE_INDEX] * (len(p) + 1), "task_id": 0}
            for p in prompts]
    batch = collate(rows, scorer.pad_id, scorer.device)
    return batch["input_ids"], batch["attention_mask"]


def _encode(scorer: Any, prompts: list[list[int]]) -> tuple[tuple[torch.Tensor], torch.Tensor]:
    """The encoder run once on ``prompts``: ((last hidden state,), mask), as ``encoder_outputs`` takes them."""
    ids, mask = _encoder_input(scorer, prompts)
    with scorer.autocast():
        hidden = scorer.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return (hidden,), mask


@no_grad
def greedy_generate(scorer: Any, prompts: list[list[int]], max_new_tokens: int,
                    dummy: bool = False) -> list[list[int]]:
    """Greedy decoding of each prompt: encoder once, decoder from the start token with its KV cache, until EOS."""
    from cl_runner.models.generation import cached_forward, greedy_loop

    encoded, mask = _encode(scorer, prompts)
    first = torch.full((len(prompts), 1), decoder_start(scorer.model), dtype=torch.long, device=scorer.device)

    def forward(step: torch.Tensor | None, cache: Any) -> tuple[torch.Tensor, Any]:
        out, cache = cached_forward(scorer.model, cache, encoder_outputs=encoded, attention_mask=mask,
                                    decoder_input_ids=first if step is None else step)
        return out.logits[:, -1], cache

    return greedy_loop(scorer, len(prompts), max_new_tokens, dummy, forward)


@no_grad
def label_logprobs(scorer: Any, prompts: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """(B, K) log-probability of each label as the decoder's output: the encoder runs once per prompt and its
    output is repeated for the K labels, which the decoder reads in one batch of B x K rows."""
    (hidden,), mask = _encode(scorer, prompts)
    batch, n_labels = len(prompts), len(labels)
    start = decoder_start(scorer.model)
    rows = [{"input_ids": [start, *label], "labels": [IGNORE_INDEX, *label], "task_id": 0} for label in labels]
    decoder = collate(rows, scorer.pad_id, scorer.device)  # (K, 1 + longest): decoder input and its targets
    dec_ids, dec_labels = decoder["input_ids"][:, :-1], decoder["labels"][:, 1:]
    with scorer.autocast():
        out = scorer.model(encoder_outputs=(hidden.repeat_interleave(n_labels, 0),),
                           attention_mask=mask.repeat_interleave(n_labels, 0),
                           decoder_input_ids=dec_ids.repeat(batch, 1), use_cache=False)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    targets = dec_labels.repeat(batch, 1)
    scores = (logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * (targets != IGNORE_INDEX)).sum(-1)
    scores = scores.view(batch, n_labels)
    if scorer.cfg.length_normalize:
        scores = scores / (dec_labels != IGNORE_INDEX).sum(-1).to(scores.dtype)
    return scores
