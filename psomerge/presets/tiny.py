"""The tiny preset (``make demo``): a character-level Llama base and one expert per task.

Deterministic (seeded data, init and training order) and cached: the result lives under
``<data_dir>/demo/<spec hash>`` and a second build with the same spec returns at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from psomerge.presets.charlm import char_tokenizer, tiny_llama_config
from psomerge.presets.common import PresetAssets, build_key, cached_build, preset_run_config, publish_build, staging, train
from psomerge.presets.tiny_tasks import ALPHABET, DEMO_TASKS, copy, unique_examples

log = logging.getLogger(__name__)
BUILD_VERSION = 1  # bump when the build procedure changes what it produces
OPTIMISATION_SIZE = 60
MAX_NEW_TOKENS = 10


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    batch_size: int = 64
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    expert_steps: int = 300
    expert_lr: float = 3e-4
    eval_examples_per_task: int = 300  # split later into optimisation and held-out
    tasks: tuple[str, ...] = tuple(t.name for t in DEMO_TASKS)
    seed: int = 0

    def key(self) -> str:
        return build_key(self, BUILD_VERSION)


def build_tiny(
    data_dir: str | Path, spec: TinySpec = TinySpec(), on_progress: Callable[[str, int, int], None] | None = None
) -> PresetAssets:
    root = Path(data_dir) / "demo" / spec.key()
    built = cached_build(root, spec.tasks)
    if built is not None:
        return built
    tmp = staging(root)
    staged = PresetAssets.at(tmp, spec.tasks)
    tasks = {t.name: t for t in DEMO_TASKS if t.name in spec.tasks}

    # Eval data first: training draws exclude every eval question, so held-out stays unseen.
    staged.datasets[spec.tasks[0]].parent.mkdir(parents=True)
    eval_questions: dict[str, set[str]] = {}
    for i, name in enumerate(spec.tasks):
        pairs = unique_examples(tasks[name].hard, spec.eval_examples_per_task, seed=spec.seed * 1000 + i)
        eval_questions[name] = {q for q, _ in pairs}
        with open(staged.datasets[name], "w") as f:
            for j, (q, a) in enumerate(pairs):
                f.write(json.dumps({"id": f"{name}-{j}", "question": q, "answer": a}) + "\n")
    all_eval = set().union(*eval_questions.values())

    tokenizer = char_tokenizer(ALPHABET)
    torch.manual_seed(spec.seed)
    base = LlamaForCausalLM(tiny_llama_config(len(tokenizer), spec.hidden, spec.layers, spec.heads))
    # Pretraining mix: copying, easy variants of every task (the format), and each task's
    # small share of hard examples, so the base is a weak generalist.
    hard_share = sum(t.pretrain_share for t in tasks.values())
    mix = [(copy(1, 8), 0.5 * (1 - hard_share))]
    mix += [(t.easy, 0.5 * (1 - hard_share) / len(tasks)) for t in tasks.values()]
    mix += [(t.hard, t.pretrain_share) for t in tasks.values() if t.pretrain_share > 0]
    started = time.perf_counter()
    train(base, tokenizer, mix, spec.pretrain_steps, spec.pretrain_lr, spec.batch_size, spec.seed, all_eval,
          lambda s: on_progress and on_progress("base", s, spec.pretrain_steps))
    base.save_pretrained(staged.base)
    tokenizer.save_pretrained(staged.base)
    log.info("pretrained base in %.0fs", time.perf_counter() - started)

    for i, name in enumerate(spec.tasks):
        expert = LlamaForCausalLM(base.config)
        expert.load_state_dict(base.state_dict())
        train(expert, tokenizer, [(tasks[name].hard, 1.0)], spec.expert_steps, spec.expert_lr, spec.batch_size,
              spec.seed + 1 + i, all_eval, lambda s, n=name: on_progress and on_progress(n, s, spec.expert_steps))
        expert.save_pretrained(staged.experts[name])
        tokenizer.save_pretrained(staged.experts[name])
    publish_build(tmp, root, spec)
    return PresetAssets.at(root, spec.tasks)


def tiny_run_config(assets: PresetAssets, optimizer: str = "pso", steps: int = 5, name: str | None = None,
                    baselines: list[str] | None = None):
    """The swarm run config for the tiny experts (what configs/demo.yaml spells out)."""
    return preset_run_config(
        assets, name=name or f"demo-{optimizer}", model_name="psomerge-demo",
        suite={"prompt_template": "{question}", "judge": {"type": "exact_match", "normalizer": "none"},
               "optimisation_size": OPTIMISATION_SIZE},
        generation={"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 256},
        optimizer=optimizer, steps=steps, baselines=baselines, source="<demo>")
