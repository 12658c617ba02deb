"""What the presets share: cached builds published atomically, the fine-tuning loop, and
run configs over a built preset."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from psomerge.hashing import digest
from psomerge.presets.tiny_tasks import ExampleMaker


def build_key(spec, version: int) -> str:
    """Folder name of a cached build: a hash of its settings and the builder's version."""
    return digest({**asdict(spec), "version": version}, 6)


@dataclass(frozen=True)
class PresetAssets:
    """A built preset: base, one expert and one eval dataset per task."""

    root: Path
    base: Path
    experts: dict[str, Path] = field(default_factory=dict)
    datasets: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path, tasks: Sequence[str]) -> "PresetAssets":
        return cls(
            root=root,
            base=root / "base",
            experts={t: root / "experts" / t for t in tasks},
            datasets={t: root / "data" / f"{t}.jsonl" for t in tasks},
        )


def cached_build(root: Path, tasks: Sequence[str]) -> PresetAssets | None:
    """The assets of a finished build at ``root`` (pointing ``current`` at it), or None."""
    if (root / "BUILT").exists():
        point_current(root)
        return PresetAssets.at(root, tasks)
    return None


def staging(root: Path) -> Path:
    """A fresh folder to build ``root`` in (an interrupted build leaves only this behind)."""
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_build(staged: Path, root: Path, spec) -> None:
    """Move a finished build from its staging folder into place (an interrupted build never
    looks finished) and point ``current`` at it."""
    (staged / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    (staged / "BUILT").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    shutil.rmtree(root, ignore_errors=True)
    staged.rename(root)
    point_current(root)


def point_current(root: Path) -> None:
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
    mix: list[tuple[ExampleMaker, float]],
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
        lab = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
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


def preset_run_config(assets: PresetAssets, *, name: str, model_name: str, suite: dict, generation: dict,
                      optimizer: str | None, steps: int, baselines: list[str] | None, source: str,
                      budget: int | None = None, **overrides):
    """A run config over a built preset: one suite per expert's dataset, with ``suite``'s
    settings (prompt, judge, split sizes) shared by all; ``overrides`` are top-level keys
    (e.g. ``preset="paper"``, ``racing=None``); ``budget`` caps the optimiser's fitness evaluations."""
    from psomerge.config import RunConfig

    extra: dict = {"baselines": baselines} if baselines is not None else {}
    return RunConfig.from_dict({
        "name": name,
        "base": str(assets.base),
        "experts": [str(p) for p in assets.experts.values()],
        "suites": [{"name": n, "dataset": str(p), "answer_field": "answer", "id_field": "id", **suite}
                   for n, p in assets.datasets.items()],
        "generation": generation,
        # no optimizer type: the preset's default (psomerge: cmaes, paper: pso)
        "optimizer": {**({"type": optimizer} if optimizer else {}), "steps": steps,
                      **({"budget": budget} if budget is not None else {})},
        "registry": {"model_name": model_name},
        **extra,
        **overrides,
    }, source=source)
