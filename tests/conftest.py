import os

# Offline and quiet before any library is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as chat_server

from psomerge.demo.synthetic import llama_config, make_family  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A random fp32 base and three perturbed experts (tiny Llama)."""
    root = tmp_path_factory.mktemp("family")
    return make_family(root, n_experts=3, config=llama_config(), noise=0.02)
