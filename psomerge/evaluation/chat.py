"""Prompts as instruct models expect them: rendered through a tokenizer's chat template, with
an optional system prompt and few-shot turns (``chat:`` in a suite).

Shots are examples of the suite's optimisation split only (never validation or held-out),
drawn for each example by a seeded generator of its own, never the example itself: a prompt
depends on the data, the split and the seed, not on the order prompts are rendered in. The
rendered prompt is what the suite's data fingerprint hashes, so a change of template, system
prompt or shots changes every cache key.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from pydantic import Field

from psomerge.errors import ConfigError
from psomerge.templates import field_validator_for
from psomerge.yamlconfig import StrictModel


class ChatSettings(StrictModel):
    """A suite's ``chat:`` section."""

    tokenizer: Path | None = None  # a folder holding a tokenizer with a chat template; default: the run's base model
    system: str | None = None  # a system message before every prompt, as written (no fields filled)
    shots: int = Field(0, ge=0)  # few-shot user/assistant turns, from the optimisation split only
    shot_answer_template: str = "{answer}"  # a shot's assistant turn, filled from its record and reference

    check_templates = field_validator_for("shot_answer_template")


Message = dict[str, str]


class ChatTemplate:
    """A tokenizer's chat template as a function of messages to prompt text."""

    def __init__(self, folder: str | Path, *, suite: str):
        from transformers import AutoTokenizer

        self.folder, self.suite = Path(folder), suite
        if not self.folder.is_dir():
            raise ConfigError(f"eval suite {suite!r}: key 'chat.tokenizer': tokenizer folder {folder} does not exist")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"eval suite {suite!r}: key 'chat.tokenizer': cannot load a tokenizer from {folder} "
                              f"({exc})") from None
        if not self.tokenizer.chat_template:
            raise ConfigError(f"eval suite {suite!r}: key 'chat': the tokenizer in {folder} has no chat template "
                              "(no 'chat_template' in its tokenizer_config.json, no chat_template.jinja): set "
                              "chat.tokenizer to a tokenizer folder that has one, or remove 'chat'")
        # Both backends tokenise prompts with the tokenizer's special tokens; where it adds BOS
        # itself, a BOS the template writes too would be doubled, so it is dropped from the text.
        bos = self.tokenizer.bos_token
        adds_bos = bos is not None and self.tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            self.tokenizer.bos_token_id]
        self._leading_bos = bos if adds_bos else None

    @classmethod
    def for_suite(cls, suite: str, settings: ChatSettings, base_model: str | Path | None) -> "ChatTemplate":
        folder = settings.tokenizer or base_model
        if folder is None:
            raise ConfigError(f"eval suite {suite!r}: key 'chat.tokenizer': no tokenizer folder set and no run base "
                              "model to take it from")
        return cls(folder, suite=suite)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``; without a generation prompt the last (assistant)
        message is continued (lm-eval's ``gen_prefix``)."""
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja errors (e.g. a template refusing a system role)
            raise ConfigError(f"eval suite {self.suite!r}: key 'chat': the chat template of {self.folder} cannot "
                              f"render this suite's messages ({type(exc).__name__}: {exc})") from None
        if self._leading_bos and text.startswith(self._leading_bos):
            text = text[len(self._leading_bos):]
        return text


def draw_shots(index: int, pool: Sequence[int], shots: int, seed: int) -> list[int]:
    """The ``shots`` examples (positions in the suite) shown before example ``index``: drawn
    from ``pool`` (the optimisation split) without ``index`` itself, by a generator seeded
    with the suite's seed and the example's position."""
    rng = random.Random(f"chat-shots:{seed}:{index}")
    return rng.sample([j for j in pool if j != index], shots)


def chat_messages(user: str, system: str | None, shots: Sequence[tuple[str, str]]) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in shots:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": user}]
