"""Swarm benchmarks on a ~106M-parameter Llama with N = 3 experts (K = 7 basis models).

(a) memory:      peak RSS of a coefficient-space PSO run in each basis layout (`ram`: base and
                 experts in their stored dtype + DARE bit masks; `ram_dense`: K dense fp32
                 members; `compact`) vs a dense PSO over flattened fp32 weights (an equivalent
                 of pyswarms' GlobalBestPSO, which works in float64 and keeps more arrays), same
                 model, same K, same scalar draws, each in its own process; and the physical
                 minimum (base + N experts in their stored dtype + one resident model).
(b) materialise: time to materialise one particle into the resident model in each layout vs
                 the bandwidth floor, one pass reading the N + 1 members and the N masks the
                 default layout holds (and vs the former floor, `t.sum()` over the K stacked
                 fp32 tensors), in alternating pairs in the same process.

Usage: .venv/bin/python benchmarks/swarm.py [memory|materialise|all]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psomerge.io import Checkpoint  # noqa: E402
from psomerge.paths import data_dir  # noqa: E402
from psomerge.presets.synthetic import llama_config, make_family  # noqa: E402
from psomerge.swarm import BasisSettings, PSOSettings, build_basis  # noqa: E402
from psomerge.swarm.plan import ModelSize  # noqa: E402

STEPS = 2
ROOT = data_dir() / "bench" / "family-106m"
GiB = 1024**3
LAYOUTS = ("ram", "ram_dense", "compact")


def family() -> tuple[Path, list[Path]]:
    if not (ROOT / "expert2" / "config.json").exists():
        make_family(ROOT, 3, llama_config(hidden=768, layers=8, vocab=32000, intermediate=2048, heads=12), noise=0.002)
    return ROOT / "base", [ROOT / f"expert{i}" for i in range(3)]


def cache_dir() -> Path:
    return data_dir() / "cache" / "basis"


def fitness_of(model: torch.nn.Module) -> float:
    """Cheap and identical on both sides: generation costs the same for either layout."""
    return -float(sum(p.detach()[..., :8].double().square().sum() for p in model.parameters()))


def run_ours(storage: str) -> None:
    from transformers import AutoModelForCausalLM

    from psomerge.swarm import PSOMerging, run_optimizer
    from psomerge.swarm.cache import CachedFitness

    base, experts = family()
    basis = build_basis(base, experts, cache_dir(), BasisSettings(storage=storage))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def fitness(x):
        basis.materialise(x, model)
        return CachedFitness(fitness_of(model), {}, {})

    run_optimizer(PSOMerging(basis.k, 1, PSOSettings(steps=STEPS)), fitness)


def run_dense() -> None:
    from torch.nn.utils import vector_to_parameters
    from transformers import AutoModelForCausalLM

    base, experts = family()
    basis = build_basis(base, experts, cache_dir(), BasisSettings(storage="mmap"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    k = basis.k
    dim = sum(p.numel() for p in model.parameters())
    x = torch.empty(k, dim)  # particle i starts at basis model i
    for i, m in enumerate(basis.members):
        x[i] = torch.cat([m.get(n).float().reshape(-1) for n in names])
        m.close()
    v = torch.zeros_like(x)
    pbest = x.clone()
    cfg = PSOSettings(steps=STEPS)
    rng = np.random.Generator(np.random.PCG64(cfg.seed))

    def fitness(vec):
        vector_to_parameters(vec, model.parameters())
        return fitness_of(model)

    for m in basis.members:  # as the coefficient side does: no file pages kept mapped
        m.close()
    fit = torch.tensor([fitness(xi) for xi in x])
    pfit = fit.clone()
    gbest = x[int(torch.argmax(fit))].clone()
    gfit = float(fit.max())
    for _ in range(cfg.steps):
        r1, r2 = rng.random((k, 1)), rng.random((k, 1))
        for i in range(k):  # in place, one particle at a time: the leanest dense update
            v[i].mul_(cfg.inertia)
            v[i].add_(pbest[i] - x[i], alpha=cfg.cognitive * float(r1[i, 0]))
            v[i].add_(gbest - x[i], alpha=cfg.social * float(r2[i, 0]))
            x[i].add_(v[i])
        fit = torch.tensor([fitness(xi) for xi in x])
        better = fit > pfit
        for i in torch.nonzero(better).reshape(-1).tolist():
            pbest[i].copy_(x[i])
            pfit[i] = fit[i]
        if float(fit.max()) > gfit:
            gfit = float(fit.max())
            gbest.copy_(x[int(torch.argmax(fit))])


def measure(role: str) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, f"_{role}"])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{role} run failed")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / GiB


def physical_minimum() -> int:
    """Base + N experts in their stored dtype + one fp32 resident model, from the headers."""
    base, experts = family()
    sizes = [ModelSize.of(Checkpoint(p)) for p in [base, *experts]]
    return sum(s.stored_bytes for s in sizes) + sizes[0].numel * 4


def memory() -> None:
    base, experts = family()
    build_basis(base, experts, cache_dir(), BasisSettings(storage="mmap"))  # DARE masks, once
    minimum = physical_minimum() / GiB
    t_dense, m_dense = measure("dense")
    print(f"(a) PSO, K=7, {STEPS} steps ({7 * (STEPS + 1)} materialisations), ~106M parameters; physical minimum "
          f"(base + 3 experts stored + one fp32 resident) {minimum:.2f} GiB")
    print(f"    dense fp32 PSO                       : peak {m_dense:6.2f} GiB, {t_dense:5.1f} s")
    for storage in LAYOUTS:
        t, m = measure(f"ours-{storage}")
        print(f"    coefficient space, storage={storage:9}: peak {m:6.2f} GiB, {t:5.1f} s -> dense/ours "
              f"{m_dense / m:.2f}x, {m / minimum:.2f}x the physical minimum")


def one_pass_read():
    """The floor kernel: one parallel pass reading every entry of 4 fp32 members, then one
    reading 3 masks' bytes (a vectorised reduction: it reads, computes next to nothing)."""
    import numba

    @numba.njit(parallel=True, fastmath=True, nogil=True)
    def read(d0, d1, d2, d3, m0, m1, m2):
        acc = np.float32(0.0)
        for i in numba.prange(d0.shape[0]):
            acc += d0[i] + d1[i] + d2[i] + d3[i]
        bits = 0
        for i in numba.prange(m0.shape[0]):
            bits += m0[i] + m1[i] + m2[i]
        return acc, bits

    return read


def materialise() -> None:
    from transformers import AutoModelForCausalLM

    base, experts = family()
    layouts = {s: build_basis(base, experts, cache_dir(), BasisSettings(storage=s)) for s in LAYOUTS}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    held = layouts["ram"]._layout  # the N + 1 members and N packed masks of every name
    per_name = [([t.reshape(-1).numpy() for t in held.dense[n]], [b.numpy() for b in held.bits[n]])
                for n in held.dense]
    stacked = list(layouts["ram_dense"]._layout.stacked.values())  # the K stacked fp32 tensors of every name
    read = one_pass_read()
    rng = np.random.default_rng(0)

    def floor():
        for members, masks in per_name:
            read(*members, *masks)

    def torch_floor():  # the former floor: t.sum() per stacked tensor
        for t in stacked:
            t.sum()

    def paired(fn, against, repeats=15):
        """Median time of fn and of the floor, measured alternately so that drifts of this
        shared machine hit both alike, and the median of the per-pair ratios."""
        fn(), against()  # warm: compiles the kernel, faults pages in
        mine, base, ratios = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            against()
            t1 = time.perf_counter()
            fn()
            t2 = time.perf_counter()
            base.append(t1 - t0)
            mine.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
        return statistics.median(mine), statistics.median(base), statistics.median(ratios)

    alpha = rng.normal(0, 0.3, size=(1, 7))
    alpha += (1 - alpha.sum()) / 7
    floor_gb = sum(a.nbytes for members, masks in per_name for a in [*members, *masks]) / 1e9
    old_gb = sum(t.numel() * 4 for t in stacked) / 1e9
    print(f"(b) materialise one particle, K=7, 15 alternating pairs, {torch.get_num_threads()} threads; floor = one "
          f"pass reading the 4 members and 3 masks the default layout holds ({floor_gb:.2f} GB, numba); torch floor "
          f"= t.sum() over the 7 stacked fp32 members ({old_gb:.2f} GB), the former floor")
    for storage, basis in layouts.items():
        t, f, r = paired(lambda: basis.materialise(alpha, model), floor)
        print(f"    storage={storage:9}: materialise {t * 1e3:6.1f} ms, floor {f * 1e3:6.1f} ms -> {r:.2f}x floor "
              f"(basis {basis.nbytes() / 1e9:.2f} GB)")
    for storage in ("ram", "ram_dense"):
        t, f, r = paired(lambda: layouts[storage].materialise(alpha, model), torch_floor)
        print(f"    storage={storage:9}: materialise {t * 1e3:6.1f} ms, torch floor {f * 1e3:6.1f} ms -> {r:.2f}x")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what.startswith("_ours-"):
        run_ours(what.removeprefix("_ours-"))
    elif what == "_dense":
        run_dense()
    else:
        if what in ("memory", "all"):
            memory()
        if what in ("materialise", "all"):
            materialise()
