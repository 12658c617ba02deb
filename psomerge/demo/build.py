"""Build the demo: a tiny character-level Llama base and one expert per demo task.

Deterministic (seeded data, init and training order) and cached: the result lives under
``<data_dir>/demo/<spec hash>`` and a second build with the same spec returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from psomerge.demo.charlm import char_tokenizer, tiny_llama_config
from psomerge.demo.tasks import ALPHABET, DEMO_TASKS, Generator, copy, unique_examples

log = logging.getLogger(__name__)
BUILD_VERSION = 1  # bump when the build procedure changes what it produces


@dataclass(frozen=True)
class DemoSpec:
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


def build_key(spec, version: int) -> str:
    """Folder name of a cached build: a hash of its settings and the builder's version."""
    payload = json.dumps({**asdict(spec), "version": version}, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True)
class DemoAssets:
    """A built preset: base, one expert and one eval dataset per task."""

    root: Path
    base: Path
    experts: dict[str, Path] = field(default_factory=dict)
    datasets: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path, tasks: Sequence[str]) -> "DemoAssets":
        return cls(
            root=root,
            base=root / "base",
            experts={t: root / "experts" / t for t in tasks},
            datasets={t: root / "data" / f"{t}.jsonl" for t in tasks},
        )


def build_demo(
    data_dir: str | Path, spec: DemoSpec = DemoSpec(), on_progress: Callable[[str, int, int], None] | None = None
) -> DemoAssets:
    root = Path(data_dir) / "demo" / spec.key()
    assets = DemoAssets.at(root, spec.tasks)
    if (root / "BUILT").exists():
        _point_current(root)
        return assets
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    staged = DemoAssets.at(tmp, spec.tasks)
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
    return assets


def publish_build(staged: Path, root: Path, spec) -> None:
    """Move a finished build from its staging folder into place (an interrupted build never
    looks finished) and point ``current`` at it."""
    (staged / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    (staged / "BUILT").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    shutil.rmtree(root, ignore_errors=True)
    staged.rename(root)
    _point_current(root)


def _point_current(root: Path) -> None:
    """``demo/current`` -> the latest build, so recipes in configs/ can name stable paths."""
    link = root.parent / "current"
    if link.is_symlink() and link.readlink() == Path(root.name):
        return
    tmp = root.parent / f".current.{root.name}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(root.name, target_is_directory=True)
    tmp.replace(link)


def train(
    model: LlamaForCausalLM,
    tokenizer,
    mix: list[tuple[Generator, float]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    exclude: set[str],
    on_step: Callable[[int], object] | None = None,
) -> None:
    """Answer-only next-token loss on freshly drawn examples; AdamW with warm-up and cosine decay."""
    rng = random.Random(seed)
    generators, weights = zip(*mix)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.train()
    for step in range(steps):
        seqs, labels = [], []
        while len(seqs) < batch_size:
            q, a = rng.choices(generators, weights)[0](rng)
            if q in exclude:
                continue
            # the question as generation will see it (a BOS where the tokenizer adds one)
            q_ids = tokenizer(q, add_special_tokens=True)["input_ids"]
            a_ids = tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(q_ids + a_ids)
            labels.append([-100] * len(q_ids) + a_ids)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step + 1)
    model.eval()
