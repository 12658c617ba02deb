"""The basis at its physical minimum: DARE members as bit masks over their expert, members in
their stored dtype, extra members, one-pass materialisation, fingerprints per layout."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from psomerge.errors import CheckpointError, ConfigError
from psomerge.io import Checkpoint, write_checkpoint
from psomerge.merging.sparsify import dare, dare_mask
from psomerge.merging.task_vectors import seeded_rng, task_vector
from psomerge.presets.synthetic import llama_config, make_family
from psomerge.swarm import BasisSettings, build_basis
from psomerge.swarm.basis import Basis
from psomerge.swarm.masks import pack_bits, packed_size, unpack_bits
from psomerge.swarm import materialise
from psomerge.swarm.materialise import masked_sum_into

P, SEED = 0.8, 5


def todays_members(base, experts, name, seed=SEED, p=P):
    """The K = 2N+1 members of tensor ``name`` as the dense-DARE basis wrote them (fp32
    checkpoints): base, experts, base + dare(expert - base) with the seeded mask."""
    b = Checkpoint(base)
    es = [Checkpoint(e) for e in experts]
    theta0 = b.get(name).float()
    dares = [theta0 + dare(task_vector(e.get(name), b.get(name)), p, seeded_rng(seed, e.fingerprint(), name))
             for e in es]
    return [theta0, *(e.get(name).float() for e in es), *dares]


def affine(rng, groups, k, scale=0.7):
    alpha = rng.normal(0.0, scale, size=(groups, k))  # negative entries included
    return alpha + (1.0 - alpha.sum(axis=1, keepdims=True)) / k


def assert_fp32_close(got, members, coeffs, what):
    """got equals sum_j coeffs_j members_j (in float64) to fp32 rounding of the terms."""
    expected = sum(float(c) * m.double() for c, m in zip(coeffs, members))
    bound = 8 * 2.0**-24 * sum(abs(float(c)) * float(m.abs().max()) for c, m in zip(coeffs, members))
    err = float((got.double() - expected).abs().max())
    assert err <= bound, f"{what}: error {err:.3e} > {bound:.3e}"


def test_masks_are_todays_dare_draws(tmp_path, family):
    base, experts = family
    basis = build_basis(base, experts, tmp_path / "b", BasisSettings(drop_rate=P, seed=SEED))
    for i, expert in enumerate(experts):
        ck = Checkpoint(expert)
        for name in basis.names:
            shape = ck.info(name).shape
            drawn = dare_mask(shape, P, seeded_rng(SEED, ck.fingerprint(), name))
            bits = basis.masks[i].bits(name)
            assert bits.numel() == packed_size(drawn.numel())
            assert torch.equal(unpack_bits(bits, drawn.numel()).reshape(shape), drawn), (expert, name)
    name = "model.layers.1.mlp.down_proj.weight"
    for j, member in enumerate(todays_members(base, experts, name)):  # DARE views are bit-identical
        assert torch.equal(basis.members[j].get(name).float(), member), basis.labels[j]


@pytest.mark.parametrize("granularity", ["model", "layer", "tensor"])
@pytest.mark.parametrize("storage", ["ram", "ram-torch", "mmap", "ram_dense", "compact"])
def test_every_layout_equals_the_dense_dare_basis(tmp_path, family, storage, granularity, monkeypatch):
    base, experts = family
    if storage == "ram-torch":  # no compiled kernel: the chunked torch sum that cuda and pinned run
        monkeypatch.setattr(materialise, "_masked_kernel", lambda codes, n: None)
        storage = "ram"
    basis = build_basis(base, experts, tmp_path / "b",
                        BasisSettings(drop_rate=P, seed=SEED, storage=storage, granularity=granularity))
    assert basis.k == 7 and basis.labels[4:] == [f"dare:{e.name}" for e in experts]
    alpha = affine(np.random.default_rng(1), basis.num_groups, basis.k)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    basis.materialise(alpha, model)
    params = dict(model.named_parameters())
    for name in basis.names:
        assert_fp32_close(params[name].detach(), todays_members(base, experts, name),
                          alpha[basis.group_of[name]], f"{storage}/{name}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_pinned_needs_cuda(tmp_path, family):
    base, experts = family
    with pytest.raises(ConfigError, match="pinned"):
        build_basis(base, experts, tmp_path / "b", BasisSettings(storage="pinned"))


def test_default_layout_holds_base_experts_and_bits_only(tmp_path, family):
    base, experts = family
    ram = build_basis(base, experts, tmp_path / "b", BasisSettings())
    ref = Checkpoint(base)
    numel = [ref.info(n).numel for n in ram.names]
    assert ram.nbytes() == 4 * 4 * sum(numel) + 3 * sum(packed_size(n) for n in numel)
    dense = build_basis(base, experts, tmp_path / "b", BasisSettings(storage="ram_dense"))
    assert dense.nbytes() == 7 * 4 * sum(numel)


def test_compiled_and_torch_paths_agree_on_odd_sizes_and_bf16():
    """The one-pass kernel (CPU) and the chunked torch sum (GPU, pinned, the vLLM engine's
    process) against float64, with a length that is not a multiple of 8 (the kernel's scalar
    tail) and mixed fp32 / bf16 members; and against each other bit for bit, zero coefficients,
    negative zeros and subnormal members included (a particle summed in another process or on
    another device is the one the host would have written)."""
    g = torch.Generator().manual_seed(0)
    n = 8 * 1000 + 5
    dense = [torch.randn(n, generator=g), torch.randn(n, generator=g).bfloat16(), torch.randn(n, generator=g),
             torch.randn(n, generator=g).bfloat16()]  # base, expert, expert, extra
    keeps = [torch.rand(n, generator=g) < 0.2 for _ in range(2)]
    bits = [pack_bits(k) for k in keeps]
    a, s = [0.9, -0.4, 0.3, 0.2], [1.5, -2.5]
    wide = [d.double() for d in dense]
    expected = sum(c * d for c, d in zip(a, wide))
    for c, k, expert in zip(s, keeps, wide[1:3]):
        expected = expected + c * k.double() * (expert - wide[0])
    for compiled in (True, False):
        out = torch.empty(n)
        masked_sum_into(out, dense, bits, a, s, compiled=compiled)
        assert float((out.double() - expected).abs().max()) < 1e-5, compiled
    strided = torch.empty(2 * n)[::2]  # a non-contiguous target takes a scratch tensor
    masked_sum_into(strided, dense, bits, a, s)
    assert float((strided.double() - expected).abs().max()) < 1e-5

    rng = np.random.default_rng(0)
    for scale in (1.0, 1e-40, 1e30):
        members = [d.float() * scale for d in dense]
        members[0][:64] = -0.0
        members[1] = members[1].bfloat16()
        for a, s in ((rng.normal(size=4).tolist(), rng.normal(size=2).tolist()), ([0.7, 0.0, 0.3, 0.0], [0.0, -1.2])):
            fused, chunked = torch.empty(n), torch.empty(n)
            masked_sum_into(fused, members, bits, a, s, compiled=True)
            masked_sum_into(chunked, members, bits, a, s, compiled=False)
            assert torch.equal(fused.view(torch.int32), chunked.view(torch.int32)), (scale, a, s)


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16fam")
    base, experts = make_family(root, n_experts=2, config=llama_config(hidden=24, heads=2), noise=0.02,
                                dtype=torch.bfloat16)
    return base, experts


def test_bf16_members_stay_bf16_and_give_the_fp32_upcast_result(tmp_path, bf16_family):
    base, experts = bf16_family
    native = build_basis(base, experts, tmp_path / "b", BasisSettings(drop_rate=P, seed=SEED, granularity="layer"))
    numel = sum(Checkpoint(base).info(n).numel for n in native.names)
    assert native.nbytes() == 3 * 2 * numel + 2 * sum(packed_size(Checkpoint(base).info(n).numel)
                                                      for n in native.names)  # half the fp32 copies
    # the same members upcast to fp32 checkpoints, with the same masks
    upcast = [write_checkpoint(tmp_path / f"fp32-{i}", Checkpoint(p), lambda name: None, dtype=torch.float32)
              for i, p in enumerate([base, *experts])]
    wide = Basis([Checkpoint(p) for p in upcast], native.masks, native.labels, "upcast", "layer", "ram")
    assert all(Checkpoint(p).info(n).dtype == torch.float32 for p in upcast for n in native.names)
    alpha = affine(np.random.default_rng(3), native.num_groups, native.k)
    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    native.materialise(alpha, a)
    wide.materialise(alpha, b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # bf16 -> fp32 is exact; the same fp32 sum follows
    mapped = build_basis(base, experts, tmp_path / "b",
                         BasisSettings(drop_rate=P, seed=SEED, granularity="layer", storage="mmap"))
    mapped.materialise(alpha, b)  # the memory-mapped bf16 members give the same sum
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_spec_reopens_the_same_basis_and_members_are_read_on_the_first_particle(tmp_path, family):
    """What another process (a vLLM engine's) needs to hold the basis: its spec, as JSON."""
    import json

    base, experts = family
    basis = build_basis(base, experts, tmp_path / "b", BasisSettings(drop_rate=P, seed=SEED, granularity="layer"))
    assert not basis._layout._held.is_set()  # a held layout reads its members on the first particle
    again = Basis.from_spec(json.loads(json.dumps(basis.spec)), "ram")
    assert (again.fingerprint, again.labels, again.group_labels) == (basis.fingerprint, basis.labels,
                                                                     basis.group_labels)
    assert [m.path for m in again.masks] == [m.path for m in basis.masks]
    alpha = affine(np.random.default_rng(4), basis.num_groups, basis.k)
    ref = Checkpoint(base)
    ours, theirs = ({n: torch.empty(ref.info(n).shape) for n in basis.names} for _ in range(2))
    basis.materialise(alpha, ours)
    again.materialise(alpha, theirs)
    assert basis._layout._held.is_set()
    assert all(torch.equal(ours[n], theirs[n]) for n in basis.names)


def test_extra_members_follow_the_dare_members(tmp_path, family):
    base, experts = family
    plain = build_basis(base, experts, tmp_path / "b", BasisSettings(drop_rate=P, seed=SEED))
    merged = plain.write_particle(np.array([[0.1, 0.5, 0.3, 0.1, 0.0, 0.0, 0.0]]), tmp_path / "static")
    for storage in ("ram", "mmap", "ram_dense", "compact"):
        basis = build_basis(base, experts, tmp_path / "b", BasisSettings(drop_rate=P, seed=SEED, storage=storage),
                            extra_members=[("merge:ties", merged)])
        assert basis.k == 8 and basis.labels[-1] == "merge:ties" and basis.labels[:7] == plain.labels
        assert basis.fingerprint != build_basis(base, experts, tmp_path / "b",
                                                BasisSettings(drop_rate=P, seed=SEED, storage=storage)).fingerprint
        name = "model.layers.0.self_attn.q_proj.weight"
        out = torch.empty(Checkpoint(base).info(name).shape)
        basis.combine_into(out, name, [0.0] * 7 + [1.0])
        assert torch.equal(out, Checkpoint(merged).get(name)), storage
        coeffs = [0.3, -0.2, 0.1, 0.2, 0.4, -0.3, 0.1, 0.4]
        basis.combine_into(out, name, coeffs)
        members = [*todays_members(base, experts, name), Checkpoint(merged).get(name)]
        assert_fp32_close(out, members, coeffs, storage)
    with pytest.raises(ConfigError, match="merge:ties"):
        build_basis(base, experts, tmp_path / "b", extra_members=[("merge:ties", merged), ("merge:ties", merged)])


def test_fingerprint_names_the_layout_and_masks_are_written_once(tmp_path, family):
    base, experts = family
    prints = {s: build_basis(base, experts, tmp_path / "b", BasisSettings(storage=s)).fingerprint
              for s in ("ram", "mmap", "ram_dense", "compact")}
    assert len(set(prints.values())) == 4
    mask_files = sorted((tmp_path / "b").glob("mask-*/dare_mask.safetensors"))
    assert len(mask_files) == 3  # one per expert, shared by every layout
    stamps = [f.stat().st_mtime_ns for f in mask_files]
    again = build_basis(base, experts, tmp_path / "b", BasisSettings(storage="ram"))
    assert again.fingerprint == prints["ram"]
    assert [f.stat().st_mtime_ns for f in mask_files] == stamps
    assert build_basis(base, experts, tmp_path / "b", BasisSettings(seed=1)).fingerprint != prints["ram"]
    assert len(list((tmp_path / "b").glob("mask-*"))) == 6


def test_nan_expert_refused_while_masks_are_drawn(tmp_path, family):
    base, experts = family
    # the writer refuses to write a NaN tensor, so the damaged expert is made by hand
    bad = tmp_path / "bad"
    shutil.copytree(experts[0], bad)
    (weights,) = bad.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        build_basis(base, [bad, experts[1]], tmp_path / "b")
    assert not list((tmp_path / "b").iterdir())  # nothing half-written left behind


def test_damaged_mask_files_are_named(tmp_path, family):
    base, experts = family
    build_basis(base, experts[:1], tmp_path / "b")
    (mask,) = (tmp_path / "b").glob("mask-*/dare_mask.safetensors")
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        build_basis(base, experts[:1], tmp_path / "b")
    mask.write_bytes(data.replace(b'"model.norm.weight"', b'"model.norm.weigh_"'))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        build_basis(base, experts[:1], tmp_path / "b")
