"""Bit-identical output to mergekit 0.1.5 on families built to hold many tied magnitudes.

Ties at the k-th magnitude are where a TIES trim by threshold and mergekit's argsort keep
different entries: fp32 experts whose deltas take a few exact values, and bf16 experts
(rounding to 8 significant bits makes equal deltas common), merged in fp32.
"""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from mergekit_runner import differing, have_mergekit, load_all, run_mergekit, write_yaml
from psomerge.merging.engine import run_merge
from psomerge.merging.recipe import MergeRecipe
from psomerge.presets.synthetic import llama_config

pytestmark = pytest.mark.skipif(not have_mergekit(), reason="mergekit 0.1.5 not installed (pip install '.[compare]')")


def tie_family(root: Path, dtype: torch.dtype, n_experts: int = 3) -> tuple[Path, list[Path]]:
    """A random 6-layer tiny Llama base (57 tensors) and experts with tie-heavy deltas.

    fp32: base values are multiples of 2^-12 and deltas multiples of 2^-9 (about 40% zero),
    so every delta is exact and takes one of five magnitudes. bf16: experts are the base plus
    Gaussian noise, rounded to bf16."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden=32, layers=6, vocab=96, heads=4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 4096).round() / 4096)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(dtype).save_pretrained(root / "base")
    experts = []
    for i in range(n_experts):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                b = base_state[name]
                if dtype == torch.float32:
                    steps = torch.randint(-4, 5, b.shape, generator=gen).float()
                    steps[torch.rand(b.shape, generator=gen) < 0.4] = 0
                    p.copy_(b + steps / 512)
                else:
                    p.copy_((b.to(dtype).float() + 0.01 * torch.randn(b.shape, generator=gen)).to(dtype))
        model.save_pretrained(root / f"expert{i}")
        experts.append(root / f"expert{i}")
    return root / "base", experts


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def ties_fixture(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ties-{request.param}".replace("torch.", ""))
    return tie_family(root, request.param)


def recipe(method, base, experts, densities, weights, top=None, dtype="float32") -> dict:
    models = []
    for e, d, w in zip(experts, densities, weights):
        params = {"weight": w}
        if d is not None:
            params["density"] = d
        models.append({"model": str(e), "parameters": params})
    data = {"merge_method": method, "models": models, "dtype": dtype}
    if method != "linear":
        data["base_model"] = str(base)
    if top:
        data["parameters"] = top
    return data


CASES = {
    "ties_d30": ("ties", [0.3, 0.3, 0.3], [1.0, 1.0, 1.0], None),
    "ties_d50_weighted": ("ties", [0.5, 0.5, 0.5], [0.6, 0.7, 0.8], {"normalize": True}),
    "ties_mixed_density": ("ties", [0.2, 0.55, 0.8], [1.0, 0.5, 0.3], {"normalize": False, "lambda": 0.9}),
    "ties_d65_int8": ("ties", [0.65, 0.65, 0.65], [1.0, 1.0, 1.0], {"int8_mask": True}),
    "task_arithmetic": ("task_arithmetic", [None] * 3, [0.4, 0.5, 0.6], {"lambda": 0.9}),
    "linear": ("linear", [None] * 3, [1.0, 1.1, 1.2], None),
}


def test_every_tensor_equals_mergekit(tmp_path, ties_fixture):
    """fp32 computation (fp32 checkpoints, or bf16 ones with ``dtype: float32``): every tensor
    of every recipe is bit-identical to mergekit's."""
    base, experts = ties_fixture
    jobs = []
    for name, (method, dens, weights, top) in CASES.items():
        jobs.append((write_yaml(tmp_path / f"{name}.yaml", recipe(method, base, experts, dens, weights, top)),
                     tmp_path / f"mk-{name}"))
    run_mergekit(jobs)
    failures = {}
    for (path, mk_out), name in zip(jobs, CASES):
        run_merge(MergeRecipe.load(path), tmp_path / f"ours-{name}")
        theirs = load_all(mk_out)
        assert len(theirs) == 57
        bad = differing(load_all(tmp_path / f"ours-{name}"), theirs)
        if bad:
            failures[name] = bad
    assert not failures, failures


def test_fixture_ties_straddle_the_threshold(ties_fixture):
    """The fixtures do what they are for: at the TIES densities above, many tensors have
    several entries tied at the k-th magnitude, some kept by argsort and some not."""
    base, experts = ties_fixture
    b, e = load_all(base), load_all(experts[0])
    straddling = 0
    for name in b:
        mag = (e[name].float() - b[name].float()).abs().reshape(-1)
        k = max(1, int(0.5 * mag.numel()))
        kth = torch.sort(mag, descending=True).values[k - 1]
        straddling += int((mag > kth).sum() < k < (mag >= kth).sum())
    assert straddling >= 40, straddling


def test_random_weights_equal_mergekit(tmp_path, family):
    """Weights that are not short binary fractions (their fp32 sum is not fp32(1.4 + 0.7)):
    every rounding step must be mergekit's."""
    base, experts = family
    cases = {"linear": ("linear", [None] * 3, [0.6, 0.8, 0.7], None),
             "linear_raw": ("linear", [None] * 3, [0.6, 0.8, 0.7], {"normalize": False}),
             "task_arithmetic": ("task_arithmetic", [None] * 3, [0.6, 0.8, 0.7], {"lambda": 0.7}),
             "ties": ("ties", [0.6, 0.8, 0.7], [0.6, 0.8, 0.7], {"normalize": True, "lambda": 1.3})}
    jobs = [(write_yaml(tmp_path / f"{n}.yaml", recipe(m, base, experts, d, w, top)), tmp_path / f"mk-{n}")
            for n, (m, d, w, top) in cases.items()]
    run_mergekit(jobs)
    failures = {}
    for (path, mk_out), name in zip(jobs, cases):
        run_merge(MergeRecipe.load(path), tmp_path / f"ours-{name}")
        bad = differing(load_all(tmp_path / f"ours-{name}"), load_all(mk_out))
        if bad:
            failures[name] = bad
    assert not failures, failures
