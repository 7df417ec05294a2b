"""Chat templating (cl_runner/tasks/chat.py) on a small tokenizer with ChatML's template: the loss falls on exactly the
assistant's content and its end-of-turn token; prompts end with the generation prompt (also when cut); labels are
whole assistant answers; generation stops at the end-of-turn token; perplexity counts the assistant's tokens; LAMOL
samples end at the end-of-turn after the cue; a tokenizer without a template is refused in one line."""

from contextlib import nullcontext

import pytest
import torch
from chatml import ScriptedLM, chatml_tokenizer

from cl_runner.config.schema import EvalConfig
from cl_runner.core.errors import ConfigError
from cl_runner.models.lm import IGNORE_INDEX
from cl_runner.models.load import train_tokenizer
from cl_runner.scoring.evaluate import Scorer, score_task
from cl_runner.strategies.base import Context
from cl_runner.strategies.pseudo import after_cue, answer_cue, end_token, parse_sample, sample_after
from cl_runner.tasks.base import Chat, Example, Task
from cl_runner.tasks.encode import encode_task

QUESTION = "What is the capital of France?"
MULTI_TURN = (("user", "Hi"), ("assistant", "Hello."), ("user", QUESTION))


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer([QUESTION, "Paris", "Hi Hello. positive negative"] * 4)


CHAT = Chat("tasks.tasks.0.chat_template")


def _task(examples, chat=CHAT, **keys):
    return Task("t", keys.pop("metric", "exact_match"), examples, examples, examples, chat=chat, **keys)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _split(example):
    ids, labels = example["input_ids"], example["labels"]
    prompt = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    return prompt, [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


def test_the_loss_falls_on_exactly_the_assistants_content_and_end_of_turn(tok):
    encoded = encode_task(_task([Example(QUESTION, " Paris")], Chat("k", "Be brief.")), 0, tok, 128)
    example = encoded.train[0]
    prompt, target = _split(example)
    assert example["input_ids"] == prompt + target  # the prompt is one block, then the target
    assert tok.decode(prompt) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + QUESTION +
                                  "<|im_end|>\n<|im_start|>assistant\n")  # the assistant's header is not trained
    assert target == _ids(tok, "Paris<|im_end|>")  # no leading space, no EOS, not the newline after the turn
    assert target[-1] == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    assert example["input_ids"] == _ids(tok, tok.apply_chat_template(  # the template's own rendering
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
         {"role": "assistant", "content": "Paris"}], tokenize=False).removesuffix("\n"))


def test_earlier_assistant_turns_are_prompt_and_a_conversations_own_system_turn_wins(tok):
    chat = Chat("k", "ignored: the conversation has its own")
    turns = (("system", "Be terse."), *MULTI_TURN)
    prompt, target = _split(encode_task(_task([Example("x", " Paris", turns)], chat), 0, tok, 128).train[0])
    assert tok.decode(prompt) == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                  "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n" + QUESTION +
                                  "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(target) == "Paris<|im_end|>"


def test_evaluation_items_end_with_the_generation_prompt_and_stop_at_the_end_of_turn(tok):
    encoded = encode_task(_task([Example(QUESTION, " Paris", MULTI_TURN)]), 0, tok, 128)
    item = encoded.test[0]
    assert tok.decode(item.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert item.prompt_text == tok.decode(item.prompt_ids)  # with its special tokens: predictions show the turns
    assert item.target == " Paris" and item.target_ids == _ids(tok, "Paris<|im_end|>")
    assert encoded.stop_ids == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_long_prompt_is_cut_in_the_middle_and_keeps_the_generation_prompt(tok):
    long_question = " ".join([QUESTION] * 30)
    encoded = encode_task(_task([Example(long_question, " Paris")]), 0, tok, 40)
    prompt, target = _split(encoded.train[0])
    assert len(prompt) + len(target) == 40 and encoded.cut["train"] == 1
    assert tok.decode(prompt).startswith("<|im_start|>user\n")
    assert tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(target) == "Paris<|im_end|>"  # never cut


def test_labels_are_whole_assistant_answers(tok):
    encoded = encode_task(_task([Example("Sentiment of: nice", " positive")], labels=[" positive", " negative"],
                                metric="label_accuracy"), 0, tok, 64)
    assert encoded.label_ids == [_ids(tok, "positive<|im_end|>"), _ids(tok, "negative<|im_end|>")]


def test_a_tokenizer_without_a_chat_template_is_refused_in_one_line_naming_the_key():
    plain = train_tokenizer([QUESTION, "Paris"], 300)
    with pytest.raises(ConfigError) as err:
        encode_task(_task([Example(QUESTION, " Paris")], Chat("tasks.tasks.2.chat_template")), 0, plain, 64)
    message = str(err.value)
    assert message.startswith("tasks.tasks.2.chat_template: the tokenizer") and "has no chat template" in message
    assert "\n" not in message


def _scorer(model, tok):
    return Scorer(model=model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, device=torch.device("cpu"),
                  autocast=nullcontext, batch_size=8, cfg=EvalConfig(), examples=True,
                  decode=lambda ids: tok.decode(ids, skip_special_tokens=True))


def test_generation_stops_at_the_end_of_turn_token(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # after the answer, a model that was not stopped writes the template's next turn
    script = [*_ids(tok, "Paris"), end, *_ids(tok, "\n<|im_start|>user\nHi"), tok.eos_token_id]
    encoded = encode_task(_task([Example(QUESTION, " Paris")]), 0, tok, 128)
    model = ScriptedLM(script, len(tok))
    result = score_task(_scorer(model, tok), encoded, "exact_match", "", None, max_new_tokens=len(script))
    assert result["examples"][0]["generated"] == "Paris" and result["score"] == 1.0
    assert model.calls == len(_ids(tok, "Paris")) + 1  # it stopped there: one step per token, the last <|im_end|>
    encoded.stop_ids = []  # the end-of-turn no longer ends it: the next turn is generated (and scored wrong)
    result = score_task(_scorer(ScriptedLM(script, len(tok)), tok), encoded, "exact_match", "", None,
                        max_new_tokens=len(script))
    assert result["examples"][0]["generated"] == "Paris\nuser\nHi" and result["score"] == 0.0


def test_perplexity_counts_the_assistants_tokens(tok):
    examples = [Example(QUESTION, " Paris"), Example("Hi", " Hello.")]
    encoded = encode_task(_task(examples, metric="perplexity"), 0, tok, 128)
    result = score_task(_scorer(ScriptedLM([0], len(tok)), tok), encoded, "perplexity", "", None)
    assert result["tokens"] == len(_ids(tok, "Paris<|im_end|>")) + len(_ids(tok, "Hello.<|im_end|>"))


def test_lamol_samples_of_a_chat_task_end_at_the_end_of_turn_after_the_cue(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    train = encode_task(_task([Example(QUESTION, " Paris"), Example("Hi", " Hello.")], Chat("k", "Be brief.")),
                        0, tok, 128).train
    cue = answer_cue(train)
    assert tok.decode(cue) == "<|im_end|>\n<|im_start|>assistant\n"  # the template's generation prompt
    assert end_token(train, tok.eos_token_id) == end  # chat examples end with the end-of-turn, not EOS
    assert after_cue(train, end, cue) == cue  # the prompts hold end-of-turn tokens of their own
    sample = train[0]["input_ids"]  # the model writes a whole templated example, then more
    model = ScriptedLM([*sample, *_ids(tok, "\nmore"), end], len(tok))
    ctx = Context(model=model, device=torch.device("cpu"), autocast=nullcontext, collate=None, task_names=["t"],
                  train_sets=[train])

    def rows(after):
        return sample_after(ctx, 0, 2, len(sample) + 4, end, 3, 1, 1.0, torch.Generator().manual_seed(0), 2, after)

    assert rows(cue) == [sample, sample]  # through the answer's end-of-turn, not the system turn's
    example, outcome = parse_sample(sample, cue, end, len(cue) + 1, 0)
    assert outcome == "kept" and example == train[0] | {"task_id": 0}
    first_end = sample.index(end) + 1  # without the cue rule, the system turn's end-of-turn would end the sample
    assert rows(None) == [sample[:first_end]] * 2
    assert parse_sample(sample[:first_end], cue, end, len(cue) + 1, 0) == (None, "no_cue")
