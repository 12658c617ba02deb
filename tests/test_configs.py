"""Every example run config in configs/ validates (its paths are checked when a run loads it)."""

from pathlib import Path

import pytest

from psomerge.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(path):
    cfg = RunConfig.load(path, check_paths=False)
    assert cfg.suites and cfg.experts
    assert cfg.generation.cache_config()["backend"] == cfg.generation.backend
