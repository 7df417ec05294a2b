"""Test helpers for chat templating: a small BPE tokenizer with ChatML's special tokens and template (SmolLM2's and
Qwen's turn format, without a default system turn), and a scripted causal LM whose greedy output is fixed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from cl_runner.models.load import train_tokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TURN_TOKENS = ["<|im_start|>", "<|im_end|>"]


def chatml_tokenizer(texts: list[str], vocab_size: int = 400, save_to: Path | None = None):
    """A byte-level BPE trained on ``texts`` (EOS ``<|endoftext|>``, another token than the end-of-turn
    ``<|im_end|>``) with ChatML's turn tokens and template; saved as a tokenizer directory when asked."""
    tokenizer = train_tokenizer([*texts, "system user assistant"], vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": TURN_TOKENS})
    tokenizer.chat_template = CHATML
    if save_to is not None:
        tokenizer.save_pretrained(save_to)
    return tokenizer


class ScriptedLM(torch.nn.Module):
    """A causal LM that, for every row, predicts ``script[k]`` at its k-th forward call on one cache (the prompt,
    then one token per step): greedy decoding and top-1 sampling both produce ``script``."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so that the model has a device and dtype

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        self.calls += 1
        step = 0 if past_key_values is None else past_key_values
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=step + 1)
