"""What a generation backend is: a resident model that turns prompts into answers.

A backend keeps one model resident for a whole run. The swarm writes each particle into
its weights (``weights``: a torch model, or a name -> tensor mapping) and calls
``weights_changed()``; ``generate`` then answers with those weights. What changes answers
is the backend's settings (``settings.py``), part of every cache key.
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


@runtime_checkable
class Generator(Protocol):
    stats: GenerationStats

    @property
    def weights(self) -> Any:
        """What a particle is written into: a torch model or a mapping name -> tensor."""

    def generate(self, prompts: Sequence[str]) -> list[str]:
        """Greedy answers, in order."""

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
