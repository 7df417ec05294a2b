"""The model kind: one object, chosen once when the model is built (``kind_of``), that owns what differs between
kinds of model. Everyone else keeps examples in the causal layout (``lm.Encoded``: prompt + target, ``-100`` on
the prompt) and asks the kind, kept on the run's ``Context`` and ``Scorer``, instead of testing the model's config:

- the batch the model reads (``model_batch``, ``training_batch``: packing too) and its forward's keyword
  arguments (``model_inputs``); the tokens it reads per example and the hidden states it returns (I-LoRA);
- greedy generation and label scoring (on ``generation.greedy_loop`` and ``cached_forward``);
- facts strategies ask about: whether the forward needs the padding mask (Fisher's batched per-example
  gradients), whether soft prompts can be prepended (prompt tuning).

Two kinds: ``CausalLM`` (decoder-only: GPT-2, Llama, ...) and ``EncoderDecoder`` (T5, BART: ``seq2seq.py``
describes its layout). A new kind (a chat-templated causal LM, say) subclasses ``ModelKind`` or ``CausalLM`` and
is chosen in ``kind_class``, the only place that reads ``config.is_encoder_decoder`` besides ``seq2seq.py``'s
config-time checks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cl_runner.core.errors import ConfigError
from cl_runner.core.lazy import no_grad
from cl_runner.models.generation import cached_forward, greedy_loop, left_pad
from cl_runner.models.lm import IGNORE_INDEX, Encoded, collate, pack, target_count
from cl_runner.models.seq2seq import ENCODER_KEYS, MODEL_INPUTS, decoder_start, encoder_decoder_batch

Batch = dict[str, "torch.Tensor"]
Collate = Callable[[list[Encoded]], Batch]
HiddenStates = list[tuple[tuple["torch.Tensor", ...], "torch.Tensor"]]  # (states of one stack, its (B, L) mask)


class ModelKind(ABC):
    """What a kind of model answers. ``scorer`` arguments are ``scoring.evaluate.Scorer``s (model, pad and EOS
    ids, device, autocast, ``cfg.length_normalize``)."""

    name: ClassVar[str]
    auto_class: ClassVar[str]  # the transformers Auto class that builds and loads this kind
    padding_needs_mask: ClassVar[bool]  # a right-padded row needs its attention mask to give the example's own loss

    @classmethod
    @abstractmethod
    def complete_config(cls, config: Any, tokenizer: Any) -> None:
        """Set what a config built from ``model.arch`` (with ``tokenizer``'s ids) needs and does not say."""

    @classmethod
    @abstractmethod
    def for_model(cls, model: torch.nn.Module) -> ModelKind:
        """This kind for a loaded ``model`` (ids read from its config)."""

    @abstractmethod
    def model_batch(self, batch: Batch, examples: list[Encoded] | None = None) -> Batch:
        """A collated causal batch (right-padded) as the model reads it, ``labels`` in the causal convention of
        ``lm`` (position t predicts token t + 1). With the batch's ``examples`` lengths are counted on the host."""

    @abstractmethod
    def model_inputs(self, batch: Batch) -> Batch:
        """The keyword arguments of the model's forward that ``model_batch``'s ``batch`` holds."""

    def training_batch(self, examples: list[Encoded], collate: Collate,
                       pack_length: int | None = None) -> tuple[Batch, dict[str, Any]]:
        """(batch, forward keyword arguments) of one training micro-batch; ``pack_length``: packed rows."""
        if pack_length is not None:
            raise ConfigError(f"train.pack: not supported with {self.name} models; set train.pack=false")
        batch = self.model_batch(collate(examples), examples)
        return batch, self.model_inputs(batch)

    @abstractmethod
    def model_tokens(self, example: Encoded) -> int:
        """The real (unpadded) positions the model reads for ``example``, over all its stacks."""

    @abstractmethod
    def hidden_states(self, outputs: Any, batch: Batch) -> HiddenStates:
        """Per stack of blocks, the hidden states of a forward run with ``output_hidden_states`` on ``batch`` (in
        ``model_batch``'s layout) and the mask of their real positions."""

    @abstractmethod
    def greedy_generate(self, scorer: Any, prompts: list[list[int]], max_new_tokens: int,
                        dummy: bool = False) -> list[list[int]]:
        """Greedy continuation of each prompt until EOS (without it), a finished row leaving the batch
        (``generation.greedy_loop``). ``dummy``: a batch that only keeps this rank in step with the others (FSDP),
        done from the start."""

    @abstractmethod
    def label_logprobs(self, scorer: Any, prompts: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
        """(B, K) log-probability of each label after each prompt (divided by the label's length with
        ``scorer.cfg.length_normalize``)."""


@dataclass(frozen=True)
class CausalLM(ModelKind):
    """A decoder-only LM: prompt and target in one sequence, read as collated; left padding with explicit position
    ids for generation and label scoring, the prompt's KV cache reused by every label."""

    name: ClassVar[str] = "causal"
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    padding_needs_mask: ClassVar[bool] = False  # right padding is never attended to by a real position

    @classmethod
    def complete_config(cls, config: Any, tokenizer: Any) -> None:
        pass  # the tokenizer's ids, set by the loader, are all a causal LM needs

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> CausalLM:
        return cls()

    def model_batch(self, batch: Batch, examples: list[Encoded] | None = None) -> Batch:
        return batch

    def model_inputs(self, batch: Batch) -> Batch:
        return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}

    def training_batch(self, examples: list[Encoded], collate: Collate,
                       pack_length: int | None = None) -> tuple[Batch, dict[str, Any]]:
        if pack_length is None:
            return super().training_batch(examples, collate)
        batch = pack(examples, pack_length, collate)  # examples kept apart by position_ids, not a padding mask
        return batch, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                       "attention_mask": None, "use_cache": False}

    def model_tokens(self, example: Encoded) -> int:
        return len(example["input_ids"])

    def hidden_states(self, outputs: Any, batch: Batch) -> HiddenStates:
        return [(outputs.hidden_states, batch["attention_mask"])]

    @no_grad
    def greedy_generate(self, scorer: Any, prompts: list[list[int]], max_new_tokens: int,
                        dummy: bool = False) -> list[list[int]]:
        ids, mask = left_pad(prompts, scorer.pad_id, scorer.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)

        def forward(step: torch.Tensor | None, cache: Any) -> tuple[torch.Tensor, Any]:
            nonlocal mask, positions
            if step is not None:  # one new token per row: its position follows the row's last one
                positions = positions[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out, cache = cached_forward(scorer.model, cache, input_ids=ids if step is None else step,
                                        attention_mask=mask, position_ids=positions)
            return out.logits[:, -1], cache

        def select(rows: torch.Tensor, cache: Any) -> Any:  # finished rows leave the batch
            nonlocal mask, positions
            mask, positions = mask[rows], positions[rows]
            cache.batch_select_indices(rows)
            return cache

        return greedy_loop(scorer, len(prompts), max_new_tokens, dummy, forward, select)

    @no_grad
    def label_logprobs(self, scorer: Any, prompts: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
        """The prompt runs once; every label continues from its KV cache."""
        ids, mask = left_pad(prompts, scorer.pad_id, scorer.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        batch, n_labels = len(prompts), len(labels)
        with scorer.autocast():
            out, cache = cached_forward(scorer.model, None, input_ids=ids, attention_mask=mask,
                                        position_ids=positions)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): each label's first token
        longest = max(len(label) for label in labels)
        label_ids = torch.full((n_labels, longest), scorer.pad_id, dtype=torch.long, device=scorer.device)
        label_mask = torch.zeros((n_labels, longest), dtype=torch.long, device=scorer.device)
        for k, label in enumerate(labels):
            label_ids[k, : len(label)] = torch.tensor(label)
            label_mask[k, : len(label)] = 1
        scores = first[:, label_ids[:, 0]]  # (B, K)
        if longest > 1:
            cache.batch_repeat_interleave(n_labels)
            cont_ids = label_ids[:, :-1].repeat(batch, 1)  # tokens fed; each predicts the next label token
            cont_mask = torch.cat([mask.repeat_interleave(n_labels, 0), label_mask[:, :-1].repeat(batch, 1)], dim=1)
            start = positions[:, -1:].repeat_interleave(n_labels, 0) + 1
            cont_pos = start + torch.arange(longest - 1, device=scorer.device)
            with scorer.autocast():
                cont, _ = cached_forward(scorer.model, cache, input_ids=cont_ids, attention_mask=cont_mask,
                                         position_ids=cont_pos)
            logp = torch.log_softmax(cont.logits.float(), dim=-1)
            nxt = label_ids[:, 1:].repeat(batch, 1)
            gathered = logp.gather(-1, nxt[..., None]).squeeze(-1) * label_mask[:, 1:].repeat(batch, 1)
            scores = scores + gathered.sum(-1).view(batch, n_labels)
        if scorer.cfg.length_normalize:
            scores = scores / label_mask.sum(-1).to(scores.dtype)
        return scores


@dataclass(frozen=True)
class EncoderDecoder(ModelKind):
    """T5, BART: the prompt (+ EOS) is the encoder's input, the decoder reads ``[start] + target`` (seq2seq.py).
    ``start_id``, ``pad_id``, ``eos_id``: the decoder start, padding and EOS ids of the model's config."""

    start_id: int
    pad_id: int
    eos_id: int
    name: ClassVar[str] = "encoder-decoder"
    auto_class: ClassVar[str] = "AutoModelForSeq2SeqLM"
    padding_needs_mask: ClassVar[bool] = True  # the encoder attends both ways

    @classmethod
    def complete_config(cls, config: Any, tokenizer: Any) -> None:
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = tokenizer.pad_token_id  # as T5's own checkpoints have it

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> EncoderDecoder:
        return cls(decoder_start(model), model.config.pad_token_id, model.config.eos_token_id)

    def model_batch(self, batch: Batch, examples: list[Encoded] | None = None) -> Batch:
        out = encoder_decoder_batch(batch, self.start_id, self.pad_id, self.eos_id)
        if examples is not None:
            prompts = [len(e["input_ids"]) - target_count(e) for e in examples]
            enc, dec = max(prompts) + 1, max(target_count(e) for e in examples) + 1
        else:
            lengths = torch.stack([out["attention_mask"].sum(1).max(), out["decoder_attention_mask"].sum(1).max()])
            enc, dec = lengths.tolist()
        trimmed = (*MODEL_INPUTS, "labels")  # cut to the longest row; the rest (task ids) as collated
        return {k: v[:, : enc if k in ENCODER_KEYS else dec] if k in trimmed else v for k, v in out.items()}

    def model_inputs(self, batch: Batch) -> Batch:
        return {k: batch[k] for k in MODEL_INPUTS if k in batch}

    def model_tokens(self, example: Encoded) -> int:
        return len(example["input_ids"]) + 2  # the encoder's EOS after the prompt, the decoder's start token

    def hidden_states(self, outputs: Any, batch: Batch) -> HiddenStates:
        return [(outputs.encoder_hidden_states, batch["attention_mask"]),
                (outputs.decoder_hidden_states, batch["decoder_attention_mask"])]

    def _encode(self, scorer: Any, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder run once on the prompts + EOS, right-padded: (last hidden state, mask)."""
        rows = [{"input_ids": p + [scorer.eos_id], "labels": [IGNORE_INDEX] * (len(p) + 1), "task_id": 0}
                for p in prompts]
        batch = collate(rows, scorer.pad_id, scorer.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with scorer.autocast():
            hidden = scorer.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask

    @no_grad
    def greedy_generate(self, scorer: Any, prompts: list[list[int]], max_new_tokens: int,
                        dummy: bool = False) -> list[list[int]]:
        """The encoder once, the decoder from the start token with its KV cache."""
        hidden, mask = self._encode(scorer, prompts)
        first = torch.full((len(prompts), 1), self.start_id, dtype=torch.long, device=scorer.device)

        def forward(step: torch.Tensor | None, cache: Any) -> tuple[torch.Tensor, Any]:
            out, cache = cached_forward(scorer.model, cache, encoder_outputs=(hidden,), attention_mask=mask,
                                        decoder_input_ids=first if step is None else step)
            return out.logits[:, -1], cache

        def select(rows: torch.Tensor, cache: Any) -> Any:  # finished rows leave the batch
            nonlocal hidden, mask
            hidden, mask = hidden[rows], mask[rows]
            cache.batch_select_indices(rows)
            return cache

        return greedy_loop(scorer, len(prompts), max_new_tokens, dummy, forward, select)

    @no_grad
    def label_logprobs(self, scorer: Any, prompts: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
        """The encoder runs once per prompt and its output is repeated for the K labels, which the decoder reads in
        one batch of B x K rows."""
        hidden, mask = self._encode(scorer, prompts)
        batch, n_labels = len(prompts), len(labels)
        rows = [{"input_ids": [self.start_id, *label], "labels": [IGNORE_INDEX, *label], "task_id": 0}
                for label in labels]
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


CAUSAL_LM = CausalLM()  # the default of ``Context.kind`` and ``Scorer.kind``


def kind_class(config: Any) -> type[ModelKind]:
    """The kind a transformers ``config`` describes (None, for a model without one: causal)."""
    return EncoderDecoder if getattr(config, "is_encoder_decoder", False) else CausalLM


def kind_of(model: torch.nn.Module) -> ModelKind:
    """The kind of a loaded ``model`` (or of the Hugging Face model inside a wrapper): chosen once, when the run
    builds the model, and passed on (``Context.kind``, ``Scorer.kind``)."""
    return kind_class(getattr(model, "config", None)).for_model(model)
