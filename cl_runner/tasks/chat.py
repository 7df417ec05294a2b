"""An example as the tokenizer's chat template renders it: the prompt conversation (an optional system turn, then
the user turn, or the turns of a chat ``messages`` row) ending with the generation prompt, and the target as the
assistant's turn, so that the loss falls on the assistant's content and its end-of-turn token only.

The split is the template's own rendering: the conversation with ``add_generation_prompt=True`` must be the start
of the whole conversation rendered with the answer, and what follows it is the assistant's turn, kept up to and
including the end-of-turn token (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3; what the template writes
after it, such as ChatML's newline, is not trained). The end-of-turn token is the first special token the template
writes after an assistant's content, found once per tokenizer from a probe conversation. A template that writes
none there (plain text after the answer) gets EOS instead, as untemplated targets do. Generation stops at the
end-of-turn token as well as at EOS (``stop_ids``).
"""

from __future__ import annotations

from typing import Any

from cl_runner.core.errors import ConfigError, DataError
from cl_runner.tasks.base import Chat, Example

PROBE = "cl-runner-probe-answer"  # an assistant content no template changes, to find what follows one


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ChatFormat:
    """The chat template of ``tokenizer`` applied to one task's examples (``chat``: its options, from
    ``tasks.chat_template`` and ``system_prompt``); raises ConfigError when the tokenizer has none."""

    def __init__(self, tokenizer: Any, chat: Chat, task: str) -> None:
        self.tokenizer, self.chat, self.task = tokenizer, chat, task
        if not getattr(tokenizer, "chat_template", None):
            source = getattr(tokenizer, "name_or_path", "") or "trained on the tasks' text"
            raise ConfigError(f"{chat.key}: the tokenizer ({source}) has no chat template to format task {task!r} "
                              "with; load an instruct model's tokenizer (model.tokenizer) or set it to false")
        _, answer = self._split([("user", "x")], PROBE, "a probe conversation")
        if PROBE not in answer:
            raise ConfigError(f"{chat.key}: the tokenizer's chat template changes an assistant's content (a probe "
                              f"answer {PROBE!r} is not in its rendering), so its tokens cannot be marked")
        after = answer[answer.index(PROBE) + len(PROBE):]
        self.end_text = self._first_special(after)  # None: the template ends an answer with plain text
        if self.end_text is None:
            self.end_id, self.suffix = None, after
        else:
            self.end_id, self.suffix = tokenizer.convert_tokens_to_ids(self.end_text), ""

    def _first_special(self, text: str) -> str | None:
        """The special token that occurs first in ``text`` (the end-of-turn after an assistant's content)."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        specials = set(self.tokenizer.all_special_tokens) | {t.content for t in decoder.values() if t.special}
        found = [(text.find(s), -len(s), s) for s in specials if s and s in text]
        return min(found)[2] if found else None

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool, what: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja's TemplateError, or the template's own raise_exception
            raise DataError(f"{self.chat.key}: the tokenizer's chat template rejects {what} of task {self.task!r} "
                            f"({_first_line(exc)})") from None

    def conversation(self, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
        """``turns`` as messages, after a system turn holding the system prompt unless the turns bring one."""
        system = self.chat.system_prompt
        first = [{"role": "system", "content": system}] if system is not None and turns[0][0] != "system" else []
        return first + [{"role": role, "content": content} for role, content in turns]

    def _split(self, turns: list[tuple[str, str]], answer: str, what: str) -> tuple[str, str]:
        """(the conversation rendered with the generation prompt, the rendered rest: the assistant's turn)."""
        messages = self.conversation(turns)
        prompt = self._render(messages, True, what)
        whole = self._render([*messages, {"role": "assistant", "content": answer}], False, what)
        if not whole.startswith(prompt):
            raise DataError(f"{self.chat.key}: the chat template renders {what} of task {self.task!r} so that the "
                            "conversation with its generation prompt is not the start of the conversation with the "
                            "answer; this template cannot mark the assistant's tokens")
        return prompt, whole[len(prompt):]

    def texts(self, example: Example, what: str) -> tuple[str, str]:
        """(prompt text ending with the generation prompt, the assistant's text through its end-of-turn token)."""
        turns = list(example.messages) if example.messages is not None else [("user", example.prompt)]
        prompt, turn = self._split(turns, example.target.strip(), what)
        return prompt, self._through_end(turn, what)

    def _through_end(self, turn: str, what: str) -> str:
        if self.end_text is not None:
            if self.end_text not in turn:
                raise DataError(f"{self.chat.key}: the chat template ends {what} of task {self.task!r} without "
                                f"{self.end_text!r}, which ends its other assistant turns")
            return turn[: turn.rfind(self.end_text) + len(self.end_text)]
        return turn[: len(turn) - len(self.suffix)] if self.suffix and turn.endswith(self.suffix) else turn

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, example: Example, what: str) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids): the target ends with the end-of-turn token (EOS when the template has none)."""
        prompt, target = self.texts(example, what)
        return self.ids(prompt), self.ids(target) + ([] if self.end_id is not None else [self.tokenizer.eos_token_id])

    def label_ids(self, label: str) -> list[int]:
        """A label as the assistant's whole answer (content and end-of-turn): scored as a continuation of the
        generation prompt, so a label that is the start of another does not win by being shorter."""
        return self.encode(Example(prompt="x", target=label), f"label {label!r}")[1]

    @property
    def stop_ids(self) -> list[int]:
        """Token ids besides EOS at which generation stops: the end-of-turn token."""
        return [self.end_id] if self.end_id is not None and self.end_id != self.tokenizer.eos_token_id else []

    def readable(self, prompt_ids: list[int]) -> str:
        """A prompt as the model saw it, with the template's special tokens (predictions files)."""
        return self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
