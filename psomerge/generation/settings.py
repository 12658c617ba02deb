"""Generation settings in a run config, one model per backend (``generation.backend``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from psomerge.yamlconfig import StrictModel, tagged_union


class _Decoding(StrictModel):
    max_new_tokens: int = Field(16, gt=0)
    stop: list[str] = ["\n"]


class TransformersSettings(_Decoding):
    """One transformers model per concurrent scoring; particles are written into its parameters."""

    backend: Literal["transformers"] = "transformers"
    batch_size: int = Field(64, gt=0)

    def cache_config(self) -> dict:
        """What changes answers: part of every fitness cache key."""
        return {"backend": self.backend, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop),
                "greedy": True}


class VLLMEngineSettings(StrictModel):
    """The vLLM engine (one per resident, kept alive across particles)."""

    python: str | None = None  # the vLLM environment; default $PSOMERGE_VLLM_PYTHON or .venv-vllm beside .venv
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    memory_fraction: float = Field(0.2, gt=0, le=1)  # gpu_memory_utilization (CPU backend: share of RAM)
    max_model_len: int | None = Field(None, gt=0)
    enforce_eager: bool = True
    startup_timeout: float = Field(900.0, gt=0)
    engine_args: dict[str, Any] = {}  # passed to vllm.LLM(...) as they are


class VLLMSettings(_Decoding):
    """A vLLM engine in its own process; particles are pushed into it in place."""

    backend: Literal["vllm"] = "vllm"
    vllm: VLLMEngineSettings = VLLMEngineSettings()

    def cache_config(self) -> dict:
        return {"backend": self.backend, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop),
                "greedy": True, "dtype": self.vllm.dtype}


GenerationSettings = tagged_union({"transformers": TransformersSettings, "vllm": VLLMSettings}, key="backend",
                                  default="transformers")
