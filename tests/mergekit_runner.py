"""Run mergekit 0.1.5 itself on recipe files, several in one process (its start-up is ~5 s)."""

from __future__ import annotations

import glob
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from safetensors.torch import load_file

# What `mergekit-yaml RECIPE OUT --no-write-model-card` does, once per (recipe, out) pair.
_SCRIPT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
options = MergeOptions(write_model_card=False, quiet=True)
options.apply_global_options()
for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(recipe, encoding="utf-8") as f:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(f)), out, options=options)
"""


def have_mergekit() -> bool:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        return False
    return True


def run_mergekit(jobs: Sequence[tuple[Path, Path]]) -> None:
    """Merge each recipe file into its output folder with mergekit."""
    args = [str(p) for job in jobs for p in job]
    res = subprocess.run([sys.executable, "-c", _SCRIPT, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{res.stderr[-4000:]}")


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def load_all(folder) -> dict:
    out = {}
    for f in glob.glob(f"{folder}/*.safetensors"):
        out.update(load_file(f))
    return out


def differing(ours: dict, theirs: dict) -> list[str]:
    """Names of tensors that are not bit-identical (signed zeros compare equal)."""
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    return sorted(n for n in theirs if ours[n].dtype != theirs[n].dtype or not bool((ours[n] == theirs[n]).all()))
