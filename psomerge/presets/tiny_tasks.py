"""Procedurally generated tasks for the demo experts: deterministic given a seed."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

ExampleMaker = Callable[[random.Random], tuple[str, str]]  # -> (question, answer)


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(lo, hi)))


def addition(lo: int, hi: int) -> ExampleMaker:
    def gen(rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return f"add {a}+{b}=", str(a + b)
    return gen


def reversal(lo: int, hi: int) -> ExampleMaker:
    def gen(rng: random.Random) -> tuple[str, str]:
        s = _letters(rng, lo, hi)
        return f"rev {s}=", s[::-1]
    return gen


def digit_sort(lo: int, hi: int) -> ExampleMaker:
    def gen(rng: random.Random) -> tuple[str, str]:
        s = _digits(rng, lo, hi)
        return f"sort {s}=", "".join(sorted(s))
    return gen


def copy(lo: int, hi: int) -> ExampleMaker:
    def gen(rng: random.Random) -> tuple[str, str]:
        s = _letters(rng, lo, hi) if rng.random() < 0.5 else _digits(rng, lo, hi)
        return f"copy {s}=", s
    return gen


@dataclass(frozen=True)
class DemoTask:
    """An expert's task: ``hard`` is what the expert learns and what is evaluated; ``easy``
    goes into the base's pretraining mix so the base knows the format but not the skill.
    Experts fine-tuned from a base that has some of the skill need only small deltas, which
    is what makes merging them meaningful."""

    name: str
    hard: ExampleMaker
    easy: ExampleMaker
    pretrain_share: float  # share of pretraining drawn from ``hard``: tuned so the base is weak, not blind


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("addition", hard=addition(10, 99), easy=addition(0, 9), pretrain_share=0.06),
    DemoTask("reversal", hard=reversal(5, 8), easy=reversal(1, 3), pretrain_share=0.003),
    DemoTask("sorting", hard=digit_sort(6, 9), easy=digit_sort(1, 3), pretrain_share=0.01),
)

# Characters the demo tokenizer knows: every task's prompts and answers fit in it.
ALPHABET = string.digits + string.ascii_lowercase + " +="


def unique_examples(gen: ExampleMaker, n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """n distinct (question, answer) pairs, none of whose questions is in ``exclude``."""
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    out: list[tuple[str, str]] = []
    for _ in range(n * 50):
        q, a = gen(rng)
        if q not in seen:
            seen.add(q)
            out.append((q, a))
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct examples")
