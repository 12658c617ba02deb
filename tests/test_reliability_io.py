"""Files that are not what they claim: corrupt safetensors, corrupt caches, failed and
interrupted writes. Each case ends in an error naming the file, never a traceback or a
half-written model."""

import json
import os
import random
import resource
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from psomerge.errors import CacheError, CheckpointError
from psomerge.io import Checkpoint
from psomerge.merging.engine import run_merge
from psomerge.merging.recipe import MergeRecipe
from psomerge.swarm.cache import CachedFitness, FitnessCache

PSOMERGE = str(Path(sys.executable).parent / "psomerge")
WEIGHTS = "model.safetensors"
CLI_ENV = {**os.environ, "COLUMNS": "1000"}  # error lines unwrapped


def clone(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_header(folder, edit):
    """Rewrite the JSON header of ``folder``'s weight file with ``edit(header)``, data untouched."""
    path = folder / WEIGHTS
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


# -- safetensors files that lie ---------------------------------------------------------

def _truncate(folder):
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[:-1000])


def _append(folder):
    with open(folder / WEIGHTS, "ab") as f:
        f.write(b"\0" * 64)


def _lie_dtype(folder):
    # F32 data declared as F16: the offsets no longer fit the shape
    rewrite_header(folder, lambda h: h[first_tensor(h)].update(dtype="F16"))


def _lie_shape(folder):
    def edit(h):
        meta = h[first_tensor(h)]
        meta["shape"] = [meta["shape"][0] * 2, *meta["shape"][1:]]
    rewrite_header(folder, edit)


def _huge_header_length(folder):
    path = folder / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


def _header_not_json(folder):
    path = folder / WEIGHTS
    garbage = b"\x00\xffnot json at all"
    garbage += b" " * (-len(garbage) % 8)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", len(garbage)) + garbage + raw[8 + n :])


def _header_not_object(folder):
    path = folder / WEIGHTS
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = b"[1, 2, 3]"
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


@pytest.mark.parametrize("corrupt, says", [
    (_truncate, "truncated"),
    (_append, "bytes follow its last tensor"),
    (_lie_dtype, "header is corrupt"),
    (_lie_shape, "header is corrupt"),
    (_huge_header_length, "header length"),
    (_header_not_json, "not a readable safetensors file"),
    (_header_not_object, "not a JSON object"),
])
def test_corrupt_safetensors_is_a_checkpoint_error_naming_the_file(tmp_path, family, corrupt, says):
    _, experts = family
    bad = clone(experts[0], tmp_path / "bad-expert")
    corrupt(bad)
    with pytest.raises(CheckpointError) as e:
        ckpt = Checkpoint(bad, "bad-expert")
        for name in ckpt.tensor_names:  # if opening passed, reading must not hand out garbage
            ckpt.get(name)
    assert str(bad / WEIGHTS) in str(e.value) and says in str(e.value)


def test_corrupt_safetensors_through_the_merge_command(tmp_path, family):
    _, experts = family
    bad = clone(experts[0], tmp_path / "bad-expert")
    _truncate(bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(bad), "parameters": {"weight": 1}}, {"model": str(experts[1]), "parameters": {"weight": 1}}]}))
    res = subprocess.run([PSOMERGE, "merge", str(recipe), "--out", str(tmp_path / "o")], capture_output=True,
                         text=True, timeout=300, env=CLI_ENV)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "truncated" in res.stderr and "bad-expert" in res.stderr


# -- corrupt caches -------------------------------------------------------------------

def test_a_file_that_is_not_sqlite_is_named_with_the_fix(tmp_path):
    path = tmp_path / "fitness.sqlite"
    path.write_bytes(b"this is no database, just some text that fills a page " * 100)
    with pytest.raises(CacheError) as e:
        FitnessCache(path)
    msg = str(e.value)
    assert str(path) in msg and f"mv {path} {path}.corrupt" in msg
    assert path.read_bytes().startswith(b"this is no database")  # never overwritten


def test_a_cache_with_a_broken_table_is_named_with_the_fix(tmp_path):
    path = tmp_path / "fitness.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE fitness_cache (particle TEXT, score REAL)")
    with pytest.raises(CacheError) as e:
        FitnessCache(path)
    assert str(path) in str(e.value) and "mv " in str(e.value) and "particle" in str(e.value)


def test_a_cache_damaged_inside_is_named_with_the_fix(tmp_path):
    path = tmp_path / "fitness.sqlite"
    cache = FitnessCache(path)
    for i in range(2000):
        cache.put(f"key{i}", CachedFitness(0.5, {"t": 0.5}, {"pad": "x" * 200}))
    del cache
    with sqlite3.connect(path) as conn:  # fold the WAL in, so the damage below hits the table
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as f:  # scribble over the pages after the schema page
        f.seek(4096 * 2)
        f.write(random.Random(0).randbytes(4096 * 20))
    with pytest.raises(CacheError) as e:
        cache = FitnessCache(path)
        for i in range(2000):
            cache.get(f"key{i}")
        len(cache)
    assert str(path) in str(e.value) and "mv " in str(e.value)


# -- writes that fail -----------------------------------------------------------------

def linear_recipe(experts, weights=(1.0, 1.0)):
    return MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, weights)]})


def poisoned(expert, dst):
    clone(expert, dst)
    state = load_file(dst / WEIGHTS)
    state["model.layers.1.mlp.up_proj.weight"][2, 3] = float("nan")
    save_file(state, dst / WEIGHTS, metadata={"format": "pt"})
    return dst


def staging_left(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_intact(out, reference):
    """``out`` is the model ``reference`` holds: loadable, with the same tensors."""
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in load_file(reference / WEIGHTS).items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_failed_merge_leaves_the_model_already_there_intact(tmp_path, family):
    _, experts = family
    out = tmp_path / "out"
    run_merge(linear_recipe(experts[:2]), out)
    good = clone(out, tmp_path / "good-copy")
    bad = poisoned(experts[1], tmp_path / "nan-expert")
    with pytest.raises(CheckpointError, match="nan-expert"):
        run_merge(linear_recipe([experts[0], bad]), out)
    assert_intact(out, good)
    assert staging_left(out) == []


def _fsize_limit(limit):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_a_merge_that_hits_a_file_size_limit_keeps_the_old_model_and_no_staging(tmp_path, family):
    _, experts = family
    out = tmp_path / "out"
    run_merge(linear_recipe(experts[:2]), out)
    good = clone(out, tmp_path / "good-copy")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, (1, 2))]}))
    size = (good / WEIGHTS).stat().st_size
    res = subprocess.run([PSOMERGE, "merge", str(recipe), "--out", str(out)], capture_output=True, text=True,
                         timeout=300, preexec_fn=_fsize_limit(size // 2), env=CLI_ENV)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "File too large" in res.stderr and str(out) in res.stderr
    assert "the model already there is unchanged" in res.stderr
    assert_intact(out, good)
    assert staging_left(out) == []

    fresh = tmp_path / "fresh"  # no model there before: none after
    res = subprocess.run([PSOMERGE, "merge", str(recipe), "--out", str(fresh)], capture_output=True, text=True,
                         timeout=300, preexec_fn=_fsize_limit(size // 2), env=CLI_ENV)
    assert res.returncode == 2 and not fresh.exists() and staging_left(fresh) == []


def _can_mount_tmpfs(where):
    where.mkdir(exist_ok=True)
    try:
        res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                              f"mount -t tmpfs -o size=64k tmpfs {where}"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def test_a_merge_that_fills_the_disk_keeps_the_old_model_and_no_staging(tmp_path, family):
    """A real full disk (a small tmpfs in a private mount namespace): the write fails midway
    through the tensor data, after the shard file was allocated sparse."""
    _, experts = family
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (no user namespaces)")
    good = tmp_path / "good"
    run_merge(linear_recipe(experts[:2]), good)
    size = sum(f.stat().st_size for f in good.iterdir())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, (1, 2))]}))
    after = tmp_path / "after"
    script = textwrap.dedent(f"""
        set -u
        mount -t tmpfs -o size={size + size // 2} tmpfs {mnt}
        cp -r {good} {mnt}/out
        {PSOMERGE} merge {recipe} --out {mnt}/out > {tmp_path}/stdout 2> {tmp_path}/stderr
        echo $? > {tmp_path}/rc
        ls -a {mnt} > {tmp_path}/listing
        cp -r {mnt}/out {after}
    """)
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], check=True, timeout=300,
                   env=CLI_ENV)
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", stderr[-2000:]
    assert "No space left on device" in stderr and "Traceback" not in stderr
    assert (tmp_path / "listing").read_text().split() == [".", "..", "out"]  # no staging folder
    assert_intact(after, good)


FILL_THE_DISK = """
import json, sys
from pathlib import Path
from psomerge.errors import CacheError, CheckpointError
from psomerge.swarm.cache import CachedFitness, FitnessCache
from psomerge.swarm.pso import PSOMerging
from psomerge.swarm.run import save_checkpoint

mnt, out = Path(sys.argv[1]), Path(sys.argv[2])
cache = FitnessCache(mnt / "fitness.sqlite")
cache.put("first", CachedFitness(0.5, {}, {}))
optimizer = PSOMerging(3, 1)
save_checkpoint(mnt / "checkpoint.json", optimizer, {"step": "first"})
with open(mnt / "filler", "wb", buffering=0) as f:  # the rest of the disk
    try:
        while True:
            f.write(b"x" * 4096)
    except OSError:
        pass
said = {}
try:
    for i in range(200):
        cache.put(f"k{i}", CachedFitness(0.5, {}, {"pad": "x" * 8192}))
except CacheError as exc:
    said["cache"] = str(exc)
try:
    save_checkpoint(mnt / "checkpoint.json", optimizer, {"step": "second", "pad": "x" * 100_000})
except CheckpointError as exc:
    said["checkpoint"] = str(exc)
(mnt / "filler").unlink()
said["kept"] = [json.loads((mnt / "checkpoint.json").read_text())["step"], cache.get("first").fitness]
out.write_text(json.dumps(said))
"""


def test_a_full_disk_during_a_search_is_an_error_naming_the_file_and_keeps_what_was_written(tmp_path):
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (no user namespaces)")
    script, out = tmp_path / "fill.py", tmp_path / "said.json"
    script.write_text(FILL_THE_DISK)
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                    f"mount -t tmpfs -o size=256k tmpfs {mnt} && {sys.executable} {script} {mnt} {out}"],
                   check=True, timeout=120, env={**CLI_ENV, "PYTHONPATH": str(Path(__file__).parents[1])})
    said = json.loads(out.read_text())
    assert str(mnt / "fitness.sqlite") in said["cache"] and "full" in said["cache"]
    assert str(mnt / "checkpoint.json") in said["checkpoint"] and "No space left on device" in said["checkpoint"]
    assert "the previous step's checkpoint is intact" in said["checkpoint"]
    assert said["kept"] == ["first", 0.5]


def test_private_inputs_give_private_outputs(tmp_path, family):
    base, experts = family
    inputs = [clone(p, tmp_path / p.name) for p in (base, *experts[:2])]
    for folder in inputs:
        for f in folder.iterdir():
            f.chmod(0o644)
    public = run_merge(linear_recipe(inputs[1:]), tmp_path / "public").out_dir
    assert all(f.stat().st_mode & stat.S_IROTH for f in public.iterdir())  # the contrast: readable stays readable
    (inputs[2] / WEIGHTS).chmod(0o600)
    assert_private(run_merge(linear_recipe(inputs[1:]), tmp_path / "private").out_dir)
    (inputs[2] / WEIGHTS).chmod(0o644)
    (inputs[2] / "config.json").chmod(0o600)  # a private config (as a private tokenizer)
    assert_private(run_merge(linear_recipe(inputs[1:]), tmp_path / "private-config").out_dir)
    (inputs[2] / "config.json").chmod(0o644)
    inputs[2].chmod(0o700)  # a folder no one else may enter, with files readable by all
    assert_private(run_merge(linear_recipe(inputs[1:]), tmp_path / "private-folder").out_dir)


def assert_private(out):
    assert not out.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH)
    for f in out.iterdir():
        assert not f.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH), f.name


def test_the_swarm_writes_private_experts_into_a_private_model(char_family, tmp_path, monkeypatch):
    from psomerge.config import RunConfig
    from psomerge.pipeline import run_swarm

    root, experts, data = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path / "home"))
    private = clone(experts[1], tmp_path / "private-expert")
    (private / WEIGHTS).chmod(0o600)
    name, path = next(iter(data.items()))
    cfg = RunConfig.from_dict({
        "name": "private", "preset": "paper", "base": str(root / "base"), "experts": [str(experts[0]), str(private)],
        "suites": [{"name": name, "dataset": str(path), "optimisation_size": 4, "heldout_size": 4,
                    "judge": {"type": "exact_match"}}],
        "generation": {"max_new_tokens": 2, "batch_size": 64}, "optimizer": {"type": "pso", "steps": 0},
        "baselines": ["average"], "output_dir": str(tmp_path / "run")})
    result = run_swarm(cfg)
    assert_private(result.model_dir)
    [merge] = (tmp_path / "home" / "cache" / "merges" / "average").iterdir()  # the static baseline too
    assert_private(merge)


def test_staging_abandoned_by_a_killed_writer_is_removed(tmp_path, family):
    _, experts = family
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".out.partial-{dead.pid}"
    abandoned.mkdir()
    (abandoned / WEIGHTS).write_bytes(b"half a model")
    live = tmp_path / f".out.partial-{os.getppid()}"  # a live writer's staging is not touched
    live.mkdir()
    run_merge(linear_recipe(experts[:2]), out)
    assert not abandoned.exists() and live.exists()
    assert (out / "config.json").exists()


def test_finite_check_is_exact_where_a_fast_sum_overflows():
    from psomerge.io import check_finite

    huge = torch.full((4,), torch.finfo(torch.float32).max)  # finite, but its sum is inf
    check_finite(huge, "m", "t")
    huge[2] = float("-inf")
    with pytest.raises(CheckpointError, match=r"'m': tensor 't' holds non-finite weights \(0 NaN, 1 inf\)"):
        check_finite(huge, "m", "t")
