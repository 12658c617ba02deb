import os

# Offline and quiet before any library is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from psomerge.orchestration.settings import apply_defaults  # noqa: E402

apply_defaults()  # as the command line does, before Prefect or MLflow is imported

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as chat_server

import json  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from psomerge.presets.charlm import char_tokenizer, tiny_llama_config  # noqa: E402
from psomerge.presets.synthetic import llama_config, make_family  # noqa: E402
from psomerge.presets.tiny_tasks import ALPHABET, DEMO_TASKS, unique_examples  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A random fp32 base and three perturbed experts (tiny Llama)."""
    root = tmp_path_factory.mktemp("family")
    return make_family(root, n_experts=3, config=llama_config(), noise=0.02)


def make_char_family(root, hidden: int = 32, heads: int = 2):
    """A random char-level base, two perturbed experts, and two exact-match datasets."""
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(len(tok), hidden=hidden, layers=2, heads=heads))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    experts = []
    for i in range(2):
        e = LlamaForCausalLM(base.config)
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.05 * torch.randn_like(p))
        e.save_pretrained(root / f"e{i}")
        tok.save_pretrained(root / f"e{i}")
        experts.append(root / f"e{i}")
    data = {}
    for task in DEMO_TASKS[:2]:
        path = root / f"{task.name}.jsonl"
        with open(path, "w") as f:
            for j, (q, a) in enumerate(unique_examples(task.hard, 40, seed=1)):
                f.write(json.dumps({"id": j, "question": q, "answer": a}) + "\n")
        data[task.name] = path
    return root, experts, data


@pytest.fixture(scope="session")
def char_family(tmp_path_factory):
    return make_char_family(tmp_path_factory.mktemp("charfam"))


