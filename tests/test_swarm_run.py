"""A swarm run end to end on real (tiny) models with exact-match fitness."""


import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from psomerge.pipeline import RunContext, run_swarm
from psomerge.config import RunConfig
from psomerge.errors import ConfigError
from psomerge.evaluation.suite import EvalSuite


def make_config(root, experts, data, **opt):
    return RunConfig.from_dict({
        "name": "t", "preset": "paper", "base": str(root / "base"), "experts": [str(e) for e in experts],
        "suites": [{"name": n, "dataset": str(p), "optimisation_size": 10, "heldout_size": 20,
                    "judge": {"type": "exact_match", "normalizer": "none"}} for n, p in data.items()],
        "generation": {"max_new_tokens": 6, "batch_size": 64},
        "optimizer": {"type": "pso", "steps": 2, **opt}, "baselines": [],
        "output_dir": str(root / "run"), "cache_path": str(root / "fitness.sqlite"),
    })


def test_search_never_reads_heldout_examples(char_family, monkeypatch, tmp_path):
    root, experts, data = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    reads = []
    original = EvalSuite.split

    def spy(self, which):
        reads.append(which)
        return original(self, which)

    monkeypatch.setattr(EvalSuite, "split", spy)
    cfg = make_config(root, experts, data)
    run = run_swarm(cfg.model_copy(update={"cache_path": tmp_path / "c.sqlite"}), evaluate_heldout=False)
    assert reads and set(reads) == {"optimisation"}
    assert run.counts.scorings > 0
    # the held-out rows come after the search, and only then is the held-out split read
    reads.clear()
    run = run_swarm(cfg.model_copy(update={"cache_path": tmp_path / "c.sqlite"}))
    assert "heldout" in reads
    assert [label for label, _ in run.heldout] == ["base", "expert:e0", "expert:e1", "psomerge:paper"]
    assert run.counts.scorings == 0  # second run: every particle came from the cache
    assert (run.output_dir / "model" / "psomerge_coefficients.json").exists()


def test_written_model_equals_materialised_particle(char_family, tmp_path, monkeypatch):
    root, experts, data = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    ctx = RunContext(make_config(root, experts, data))
    coeffs = np.array([[0.2, 0.5, 0.1, 0.1, 0.1]])
    ctx.write_model(coeffs, tmp_path / "m")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    with ctx.evaluator.resident() as r:
        ctx.basis.materialise(coeffs, r.weights)
        for (name, p), q in zip(r.weights.named_parameters(), loaded.parameters()):
            assert torch.equal(p, q), name


def test_config_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "run.yaml"
    suites = "suites: [{name: s, dataset: d.jsonl}]"
    bad.write_text(f"base: b\nexperts: [e]\n{suites}\noptimizer: {{type: genetic}}\n")
    with pytest.raises(ConfigError, match=r"run.yaml.*optimizer.type"):
        RunConfig.load(bad)
    bad.write_text(f"base: b\nexperts: [e]\n{suites}\nbasis: {{drop_rate: 1.5}}\n")
    with pytest.raises(ConfigError, match=r"basis.drop_rate"):
        RunConfig.load(bad)
