"""The tiny preset (``make demo``): a character-level Llama base and one expert per task.

Deterministic (seeded data, init and training order) and cached: the result lives under
``<data_dir>/demo/<spec hash>`` and a second build with the same spec returns at once.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from psomerge.hashing import digest
from psomerge.presets.charlm import char_tokenizer, tiny_llama_config
from psomerge.presets.common import (PresetAssets, build_key, cached_build, preset_run_config,
                                     publish_build, staging, train)
from psomerge.presets.tiny_tasks import ALPHABET, DEMO_TASKS, copy, unique_examples

log = logging.getLogger(__name__)
BUILD_VERSION = 1  # bump when the build procedure changes what it produces
# The search needs enough examples to tell good merges apart: with 60 per task, merges within
# two points of each other were indistinguishable and the search fell just short of the best
# static merge; with 120 it was above it (BENCHMARKS.md, 2026-12-07).
OPTIMISATION_SIZE = 120
VALIDATION_SIZE = 60  # model selection and the promotion gate read it; the other 120 per task are held out
MAX_NEW_TOKENS = 10


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    batch_size: int = 64
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    # A stronger shared base (twice each task's share of hard examples in pretraining: it solves
    # 54-91% of each task) and gentle experts (1e-4) give small expert updates that merge as
    # published fine-tunes do: static merges beat every single expert. With a weak base (scale 1)
    # and 2e-4, the experts' large updates interfered and every static merge fell below the best
    # expert (0.10-0.23 vs 0.35 held out).
    pretrain_hard_scale: float = 2.0  # multiplies each task's share of hard examples in pretraining
    expert_steps: int = 300
    # Half of each expert's batches replay the pretraining mix: the experts keep the base's other skills
    expert_lr: float = 1e-4
    expert_replay: float = 0.5  # share of the pretraining mix in an expert's fine-tuning batches
    eval_examples_per_task: int = 300  # split later into optimisation, validation and held-out
    tasks: tuple[str, ...] = tuple(t.name for t in DEMO_TASKS)
    seed: int = 0

    def key(self) -> str:
        return build_key(self, BUILD_VERSION)

    def base_key(self) -> str:
        """The base and eval data depend only on these: builds differing in expert settings share them."""
        fields = ("hidden", "layers", "heads", "batch_size", "pretrain_steps", "pretrain_lr", "pretrain_hard_scale",
                  "eval_examples_per_task", "tasks", "seed")
        return digest({**{f: getattr(self, f) for f in fields}, "version": BUILD_VERSION}, 6)


def build_tiny(
    data_dir: str | Path, spec: TinySpec = TinySpec(), on_progress: Callable[[str, int, int], None] | None = None
) -> PresetAssets:
    root = Path(data_dir) / "demo" / spec.key()
    built = cached_build(root, spec.tasks)
    if built is not None:
        return built
    base_dir = _build_base(Path(data_dir) / "demo" / f"base-{spec.base_key()}", spec, on_progress)
    tmp = staging(root)
    staged = PresetAssets.at(tmp, spec.tasks)
    shutil.copytree(base_dir / "base", staged.base)
    shutil.copytree(base_dir / "data", staged.base.parent / "data")
    tasks = {t.name: t for t in DEMO_TASKS if t.name in spec.tasks}
    all_eval = {json.loads(line)["question"]
                for path in staged.datasets.values() for line in path.read_text().splitlines()}
    tokenizer = char_tokenizer(ALPHABET)
    base = LlamaForCausalLM.from_pretrained(staged.base, dtype=torch.float32)
    general = _pretraining_mix(tasks, spec)
    for i, name in enumerate(spec.tasks):
        expert = LlamaForCausalLM(base.config)
        expert.load_state_dict(base.state_dict())
        # a share of the pretraining mix (replay) keeps an expert's other skills, as real fine-tunes try to
        mix = [(tasks[name].hard, 1.0 - spec.expert_replay)] + [(g, w * spec.expert_replay) for g, w in general]
        train(expert, tokenizer, [(g, w) for g, w in mix if w > 0], spec.expert_steps, spec.expert_lr,
              spec.batch_size, spec.seed + 1 + i, all_eval,
              lambda s, n=name: on_progress and on_progress(n, s, spec.expert_steps))
        expert.save_pretrained(staged.experts[name])
        tokenizer.save_pretrained(staged.experts[name])
    publish_build(tmp, root, spec)
    return PresetAssets.at(root, spec.tasks)


def _pretraining_mix(tasks: dict, spec: TinySpec) -> list:
    """Copying, easy variants of every task (the format), and each task's small share of hard
    examples, so the base is a weak generalist."""
    hard = {name: t.pretrain_share * spec.pretrain_hard_scale for name, t in tasks.items()}
    hard_share = sum(hard.values())
    mix = [(copy(1, 8), 0.5 * (1 - hard_share))]
    mix += [(t.easy, 0.5 * (1 - hard_share) / len(tasks)) for t in tasks.values()]
    mix += [(t.hard, hard[name]) for name, t in tasks.items() if hard[name] > 0]
    return mix


def _build_base(root: Path, spec: TinySpec, on_progress) -> Path:
    """Eval data and the pretrained base, cached under ``root`` (shared by expert settings)."""
    if (root / "BUILT").exists():
        return root
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
    tokenizer = char_tokenizer(ALPHABET)
    torch.manual_seed(spec.seed)
    base = LlamaForCausalLM(tiny_llama_config(len(tokenizer), spec.hidden, spec.layers, spec.heads))
    started = time.perf_counter()
    train(base, tokenizer, _pretraining_mix(tasks, spec), spec.pretrain_steps, spec.pretrain_lr, spec.batch_size,
          spec.seed, set().union(*eval_questions.values()),
          lambda s: on_progress and on_progress("base", s, spec.pretrain_steps))
    base.save_pretrained(staged.base)
    tokenizer.save_pretrained(staged.base)
    log.info("pretrained base in %.0fs", time.perf_counter() - started)
    (tmp / "BUILT").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def tiny_run_config(assets: PresetAssets, optimizer: str | None = None, steps: int = 5, name: str | None = None,
                    baselines: list[str] | None = None, **overrides):
    """The swarm run config for the tiny experts (what configs/demo.yaml spells out)."""
    return preset_run_config(
        assets, name=name or f"demo-{optimizer or 'psomerge'}", model_name="psomerge-demo",
        suite={"prompt_template": "{question}", "judge": {"type": "exact_match", "normalizer": "none"},
               "optimisation_size": OPTIMISATION_SIZE, "validation_size": VALIDATION_SIZE},
        generation={"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 256},
        optimizer=optimizer, steps=steps, baselines=baselines, source="<demo>", **overrides)
