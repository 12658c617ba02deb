"""The shared weight file the vLLM backend reloads from: a valid safetensors file whose
tensors a particle is written into in place, exactly as into a resident model."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

from psomerge.config import RunConfig
from psomerge.errors import ConfigError
from psomerge.io.shared_weights import SharedWeights
from psomerge.swarm import BasisSettings, build_basis


def test_particle_written_into_shared_file_equals_resident_model(family, tmp_path):
    base, experts = family
    basis = build_basis(base, experts, tmp_path / "basis", BasisSettings(granularity="layer"))
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    plan = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    rng = np.random.default_rng(0)
    alpha = rng.normal(size=(basis.num_groups, basis.k))
    basis.materialise(alpha, model)

    fp32 = SharedWeights(plan, torch.float32, tmp_path)
    bf32 = SharedWeights(plan, torch.bfloat16, tmp_path)
    try:
        basis.materialise(alpha, fp32)
        basis.materialise(alpha, bf32)
        # another process sees the same bytes through the file, not through this process
        with safe_open(str(fp32.path), "pt") as f32, safe_open(str(bf32.path), "pt") as g:
            assert set(f32.keys()) == {n for n, _ in plan}
            for name, p in model.named_parameters():
                assert torch.equal(f32.get_tensor(name), p.data), name
                # a low-precision engine gets the fp32 sum rounded once
                assert torch.equal(g.get_tensor(name), p.data.to(torch.bfloat16)), name
        # the layout is fixed: a second particle overwrites the same pages
        path, size = fp32.path, fp32.path.stat().st_size
        basis.materialise(np.eye(basis.k)[[0] * basis.num_groups], fp32)
        assert fp32.path == path and path.stat().st_size == size
        with safe_open(str(path), "pt") as f:
            name = plan[3][0]
            assert torch.equal(f.get_tensor(name), basis.members[0].get(name).float())
    finally:
        fp32.close()
        bf32.close()
    assert not fp32.path.exists() and not bf32.path.exists()


def test_vllm_backend_without_its_environment_is_a_named_config_error(char_family, tmp_path, monkeypatch):
    root, experts, data = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"run.yaml: generation.vllm.python: .*no-venv.*make vllm-env"):
        RunConfig.from_dict({
            "base": str(root / "base"), "experts": [str(e) for e in experts],
            "suites": [{"name": n, "dataset": str(p)} for n, p in data.items()],
            "generation": {"backend": "vllm", "vllm": {"python": str(tmp_path / "no-venv" / "bin" / "python")}},
        }, source="run.yaml")
    assert not (tmp_path / "cache" / "basis").exists()  # failed before any work


def test_backend_is_part_of_the_cache_key(char_family):
    root, experts, data = char_family
    base = {"base": str(root / "base"), "experts": [str(e) for e in experts],
            "suites": [{"name": n, "dataset": str(p)} for n, p in data.items()]}
    keys = {RunConfig.from_dict({**base, "generation": g}, check_paths=False).generation.cache_config()["backend"]
            for g in ({}, {"backend": "vllm"})}
    assert keys == {"transformers", "vllm"}
    t = RunConfig.from_dict(base).generation.cache_config()
    v = RunConfig.from_dict({**base, "generation": {"backend": "vllm", "vllm": {"dtype": "bfloat16"}}},
                            check_paths=False)
    assert v.generation.cache_config() != t and v.generation.cache_config()["dtype"] == "bfloat16"


def test_weight_update_is_not_in_the_cache_key_and_in_engine_needs_the_mask_layout(char_family):
    """Both ways into a vLLM engine give it the same bits (the mask layout's torch sum is the
    compiled kernel's), so cached scores are shared; the CPU backend's plain GEMMs are not."""
    root, experts, data = char_family
    base = {"base": str(root / "base"), "experts": [str(e) for e in experts],
            "suites": [{"name": n, "dataset": str(p)} for n, p in data.items()]}

    def generation(**vllm):
        return RunConfig.from_dict({**base, "generation": {"backend": "vllm", "vllm": vllm}}, check_paths=False)

    keys = {json.dumps(generation(weight_update=w).generation.cache_config()) for w in
            ("auto", "in_engine", "shared_file")}
    assert len(keys) == 1 and "cpu_linear" not in keys.pop()  # scores cached before either option still count
    assert generation(cpu_linear="plain").generation.cache_config()["cpu_linear"] == "plain"
    for storage in ("compact", "ram_dense"):
        with pytest.raises(ConfigError, match=rf"generation.vllm.weight_update: in_engine needs basis.storage .*"
                                              rf"'{storage}'"):
            RunConfig.from_dict({**base, "basis": {"storage": storage},
                                 "generation": {"backend": "vllm", "vllm": {"weight_update": "in_engine"}}},
                                check_paths=False)
    with pytest.raises(ConfigError, match="weight_update"):
        generation(weight_update="restart")

