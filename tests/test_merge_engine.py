"""Recipes end to end: mergekit parity, CLI, dtype, errors naming the culprit."""

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from psomerge.presets.synthetic import make_family
from psomerge.errors import CheckpointError, ConfigError
from psomerge.merging.engine import run_merge
from psomerge.merging.recipe import MergeRecipe

MERGEKIT = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
PSOMERGE = str(Path(sys.executable).parent / "psomerge")

RECIPES = {
    "linear": ({"weight": 1.0}, {}),
    "task_arithmetic": ({"weight": 0.4, "density": None}, {"lambda": 0.9}),
    "ties": ({"weight": 0.6, "density": 0.3}, {"normalize": True}),
}


def write_recipe(path, method, base, experts, params, top, dtype="float32"):
    models = []
    for i, e in enumerate(experts):
        p = {k: v for k, v in params.items() if v is not None}
        p["weight"] = p["weight"] + 0.1 * i  # unequal weights exercise the weighting
        models.append({"model": str(e), "parameters": p})
    recipe = {"merge_method": method, "models": models, "dtype": dtype}
    if method != "linear":
        recipe["base_model"] = str(base)
    if top:
        recipe["parameters"] = top
    path.write_text(yaml.safe_dump(recipe))
    return path


def load_all(folder):
    out = {}
    for f in glob.glob(f"{folder}/*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.skipif(not Path(MERGEKIT).exists(), reason="mergekit 0.1.5 not installed (pip install '.[compare]')")
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_tensors_match_mergekit(tmp_path, family, method):
    base, experts = family
    params, top = RECIPES[method]
    recipe = write_recipe(tmp_path / "r.yaml", method, base, experts, params, top)
    subprocess.run([MERGEKIT, str(recipe), str(tmp_path / "mk"), "--no-write-model-card"], check=True,
                   capture_output=True)
    subprocess.run([PSOMERGE, "merge", str(recipe), "--out", str(tmp_path / "ours")], check=True, capture_output=True)
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name in theirs:
        scale = theirs[name].abs().max().clamp_min(1e-12)
        assert ((ours[name] - theirs[name]).abs().max() / scale) < 1e-5, name
    AutoModelForCausalLM.from_pretrained(tmp_path / "ours")


def test_output_dtype_follows_base_unless_recipe_says(tmp_path):
    base, experts = make_family(tmp_path / "bf", 2, dtype=torch.bfloat16)
    r = MergeRecipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                               "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]})
    run_merge(r, tmp_path / "o1")
    assert all(t.dtype == torch.bfloat16 for t in load_all(tmp_path / "o1").values())
    assert json.loads((tmp_path / "o1" / "config.json").read_text())["dtype"] == "bfloat16"
    r2 = MergeRecipe.from_dict({**r.model_dump(exclude={"source"}), "dtype": "float32"})
    run_merge(r2, tmp_path / "o2")
    assert all(t.dtype == torch.float32 for t in load_all(tmp_path / "o2").values())
    # computed in fp32: the bf16 output equals the fp32 result rounded once
    a, b = load_all(tmp_path / "o1"), load_all(tmp_path / "o2")
    assert all(torch.equal(a[k], b[k].to(torch.bfloat16)) for k in a)


def test_seeded_dare_merge_is_reproducible(tmp_path, family):
    base, experts = family
    data = {"merge_method": "dare_ties", "base_model": str(base), "seed": 3,
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.3}} for e in experts]}
    run_merge(MergeRecipe.from_dict(data), tmp_path / "a")
    run_merge(MergeRecipe.from_dict(data), tmp_path / "b")
    run_merge(MergeRecipe.from_dict({**data, "seed": 4}), tmp_path / "c")
    a, b, c = (load_all(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_filter_list_parameters(tmp_path, family):
    base, experts = family
    data = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(experts[0]),
                        "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]}}]}
    run_merge(MergeRecipe.from_dict(data), tmp_path / "f")
    out, b, e = load_all(tmp_path / "f"), load_all(base), load_all(experts[0])
    for k in out:
        assert torch.allclose(out[k], e[k] if "mlp" in k else b[k]), k


def test_nan_in_an_expert_is_named_and_nothing_half_written_is_claimed(tmp_path, family):
    base, experts = family
    bad = tmp_path / "nan-expert"
    shutil.copytree(experts[1], bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    data = {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(experts[0]), "parameters": {"weight": 1, "density": 0.5}},
                       {"model": str(bad), "parameters": {"weight": 1, "density": 0.5}}]}
    with pytest.raises(CheckpointError) as e:
        run_merge(MergeRecipe.from_dict(data), tmp_path / "out")
    assert "nan-expert" in str(e.value) and "model.layers.0.mlp.down_proj.weight" in str(e.value)
    assert not (tmp_path / "out" / "config.json").exists()  # an unfinished output is not a model


@pytest.mark.parametrize(
    "data, key",
    [
        ({"merge_method": "ties", "models": [{"model": "x", "parameters": {"weight": 1}}]}, "base_model"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"density": 1}}]},
         "models[0].parameters.weight"),
        ({"merge_method": "ties", "base_model": "b",
          "models": [{"model": "x", "parameters": {"weight": 1, "gamma": 1}}]},
         "models[0].parameters.gamma"),
        ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}],
          "parameters": {"lambda": 2}},
         "parameters.lambda"),
        ({"merge_method": "linear", "models": [{"model": "x"}], "frobnicate": 1}, "frobnicate"),
        ({"merge_method": "passthrough", "slices": []}, "slices"),
        ({"merge_method": "slerp", "models": []}, "slerp"),
        ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}], "dtype": "int4"}, "dtype"),
    ],
)
def test_recipe_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        MergeRecipe.from_dict(data, source="recipe.yaml")
    assert key in str(e.value) and "recipe.yaml" in str(e.value)


def test_cli_reports_bad_model_path(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear",
                                      "models": [{"model": "no/such/model", "parameters": {"weight": 1}}]}))
    res = subprocess.run([PSOMERGE, "merge", str(recipe), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2
    assert "no/such/model" in res.stderr and "bad.yaml" in res.stderr
