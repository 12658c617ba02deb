"""Generation backends: resident models that turn prompts into answers (transformers, vLLM)."""

from __future__ import annotations

from pathlib import Path

from psomerge.generation.protocol import GenerationStats, Generator, cut_at_stop
from psomerge.generation.settings import GenerationSettings, TransformersSettings, VLLMSettings


def open_generator(settings: TransformersSettings | VLLMSettings, model_path: str | Path,
                   device: str = "cpu") -> Generator:
    """A resident model of ``model_path``'s architecture (its weights are the base's until a
    particle is written in) behind the backend ``settings`` name."""
    if isinstance(settings, VLLMSettings):  # an engine in its own process; particles summed there or reloaded
        from psomerge.generation.vllm_backend import VLLMGenerator

        v = settings.vllm
        return VLLMGenerator(model_path, max_new_tokens=settings.max_new_tokens, stop=settings.stop,
                             python=v.python, dtype=v.dtype, memory_fraction=v.memory_fraction,
                             max_model_len=v.max_model_len, enforce_eager=v.enforce_eager,
                             engine_args=v.engine_args, startup_timeout=v.startup_timeout,
                             weight_update=v.weight_update, cpu_linear=v.cpu_linear)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psomerge.generation.transformers_backend import TransformersGenerator

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    return TransformersGenerator(model, AutoTokenizer.from_pretrained(model_path), batch_size=settings.batch_size,
                                 max_new_tokens=settings.max_new_tokens, stop=settings.stop)


__all__ = ["GenerationSettings", "GenerationStats", "Generator", "TransformersSettings", "VLLMSettings",
           "cut_at_stop", "open_generator"]
