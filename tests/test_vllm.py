"""Judging through a real vLLM OpenAI-compatible server that psomerge starts and stops.

Needs the separate vLLM environment: `make test-vllm` builds it (`make vllm-env`) and runs this.
"""

from pathlib import Path

import pytest
import torch

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM environment absent: run `make test-vllm`")


def test_llm_judge_through_vllm_server(tmp_path):
    from transformers import LlamaForCausalLM

    from psomerge.demo.charlm import char_tokenizer, tiny_llama_config
    from psomerge.demo.tasks import ALPHABET
    from psomerge.judges.llm import LLMJudge
    from psomerge.judges.protocol import Example

    tok = char_tokenizer(ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:'()?!\n-")
    config = tiny_llama_config(len(tok), hidden=256, layers=4, heads=4)
    config.max_position_embeddings = 2048
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")

    judge = LLMJudge(model="tiny-judge", max_tokens=8, on_unparseable="zero", max_retries=0, timeout=120,
                     serve={"model_path": str(tmp_path / "tiny"), "python": str(VLLM_PYTHON)})
    try:
        examples = [Example(str(i), f"add {i}+{i}=", str(2 * i)) for i in range(3)]
        scores = judge.score(examples + examples[:1], ["2", "4", "5", "2"])
        assert len(scores) == 4 and all(0.0 <= s.value <= 1.0 for s in scores)
        assert judge.stats.requests >= 3 and judge.stats.deduplicated == 1
        assert judge.stats.prompt_tokens > 0 and judge.stats.errors == 0
        server = judge._server
        assert server is not None and server._proc.poll() is None
    finally:
        judge.close()
    assert server._proc is None
