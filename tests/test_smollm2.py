"""The SmolLM2-135M preset on the real model and data shipped in PyPI packages.

The full preset (`psomerge demo --preset smollm2`) takes about 25 minutes here; these tests
build it with a few training steps and small eval files, which exercises the same code.
"""

import json

import pytest
import torch

from psomerge.presets.smollm2 import (
    GGUF_FILE, GGUF_PACKAGE, SmolSpec, build_smollm2, iso_code_records, package_file, sentiment_records,
    smollm2_run_config,
)

pytestmark = pytest.mark.slow
TINY = SmolSpec(expert_steps=2, batch_size=2, sentiment_eval=30, iso_code_eval=24, optimisation_size=8)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    return root, build_smollm2(root, TINY)


def test_real_data_is_split_before_training():
    evals, train = sentiment_records(240, seed=0)
    assert len(evals) == 240 and len(train) > 3000
    labels = [r["answer"] for r in evals]
    assert {labels.count(x) for x in ("negative", "neutral", "positive")} == {80}  # balanced
    assert not {r["prompt"] for r in evals} & {p for p, _ in train}
    evals, train = iso_code_records(129, seed=0)
    assert len(evals) == 129 and len(train) == 120  # all 249 ISO 3166-1 countries, disjoint
    assert not {r["prompt"] for r in evals} & {p for p, _ in train}
    import pycountry

    codes = [r["answer"] for r in evals] + [a.strip() for _, a in train]
    assert sorted(codes) == sorted(c.alpha_2 for c in pycountry.countries)


def test_gguf_base_converted_to_plain_safetensors(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, assets = smol
    assert (assets.base / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((assets.base / "config.json").read_text())
    gguf = package_file(GGUF_PACKAGE, GGUF_FILE)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(assets.base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(assets.base)
    ids = tok("Country: France (FRA)\nTwo-letter ISO country code:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, converted(ids).logits)
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings


def test_preset_experts_merge_through_a_swarm_run(smol, monkeypatch):
    from psomerge.pipeline import run_swarm

    root, assets = smol
    monkeypatch.setenv("PSOMERGE_HOME", str(root))
    assert set(assets.experts) == {"sentiment", "iso_code"}
    for expert in assets.experts.values():  # fine-tuned: different weights from the base
        assert (expert / "model.safetensors").stat().st_size > 500e6
    cfg = smollm2_run_config(assets, TINY, "pso", steps=1, baselines=[], preset="paper", validation_size=4)
    run = run_swarm(cfg)
    assert run.counts.scorings == run.counts.fitness_calls - run.counts.cache_hits > 0
    assert [label for label, _ in run.heldout] == ["base", "expert:sentiment", "expert:iso_code", "psomerge:paper"]
    for _, result in run.heldout:
        assert set(result.scores) == {"sentiment", "iso_code"}
        assert result.num_examples == (30 - 8 - 4) + (24 - 8 - 4)  # held-out only: not the search or validation splits
    assert (run.output_dir / "model" / "model.safetensors").exists()
