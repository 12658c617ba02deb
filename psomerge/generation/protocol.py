"""What a generation backend is: a resident model that turns prompts into answers.

A backend keeps one model resident for a whole run. The swarm writes each particle into
its weights (``weights``: a torch model, or a name -> tensor mapping) and calls
``weights_changed()``; ``generate`` then answers with those weights. A backend whose model
lives in another process may also take a particle as coefficients (``load_coefficients(basis,
coeffs)``, returning False where it does not). What changes answers is the backend's settings
(``settings.py``), part of every cache key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class GenerationStats:
    calls: int = 0
    prompts: int = 0
    new_tokens: int = 0


@dataclass(frozen=True)
class Continuation:
    """How likely a model finds a continuation of a context (one forward pass, no sampling)."""

    logprob: float  # sum over the continuation's tokens of log p(token | everything before it)
    tokens: int  # the continuation's length in tokens
    greedy_tokens: int  # of which the model's argmax prediction

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding would produce exactly this continuation (lm-eval's ``is_greedy``)."""
        return self.greedy_tokens == self.tokens


@runtime_checkable
class Generator(Protocol):
    stats: GenerationStats

    @property
    def weights(self) -> Any:
        """What a particle is written into: a torch model or a mapping name -> tensor."""

    def generate(self, prompts: Sequence[str], *, stop: Sequence[str] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers, in order. ``stop`` and ``max_new_tokens`` replace the backend's
        settings for this call (an lm-eval task's ``until`` and ``max_gen_toks``)."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]], append_eos: bool = False) -> list[Continuation]:
        """For each (context, continuation): how likely the continuation is after the context
        (with the end-of-sequence token after it when ``append_eos``)."""

    def weights_changed(self) -> None:
        """Called after a particle was written into ``weights``."""

    def close(self) -> None: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The answer up to the first stop string (either backend may run past one: transformers
    generates a fixed number of tokens, vLLM matches stops on detokenised pieces)."""
    for s in stop:
        pos = text.find(s)
        if pos >= 0:
            text = text[:pos]
    return text


def encode_continuations(tokenizer, requests: Sequence[tuple[str, str]],
                         append_eos: bool = False) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each request, as both backends score them.

    Trailing whitespace of a context moves to its continuation (tokenizers attach a space to
    the word after it), and the continuation is what the whole text adds after the context's
    own tokens (lm-eval's rules), so a continuation is scored as generation would produce it.
    A context of no tokens (lm-eval's unconditional requests, ``""``) becomes the BOS token,
    else EOS, as lm-eval does: the first continuation token needs a position predicting it.
    """
    out = []
    for context, continuation in requests:
        stripped = context.rstrip()
        if stripped != context:
            context, continuation = stripped, context[len(stripped):] + continuation
        ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
        whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
        cont = whole[len(ctx):]
        if not ctx:
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ctx = [prefix]
        if append_eos and tokenizer.eos_token_id is not None:
            cont = cont + [tokenizer.eos_token_id]
        out.append((ctx, cont))
    return out
