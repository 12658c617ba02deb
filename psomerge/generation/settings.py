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


WeightUpdate = Literal["auto", "in_engine", "shared_file"]


class VLLMEngineSettings(StrictModel):
    """The vLLM engine (one per resident, kept alive across particles)."""

    python: str | None = None  # the vLLM environment; default $PSOMERGE_VLLM_PYTHON or .venv-vllm beside .venv
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    memory_fraction: float = Field(0.2, gt=0, le=1)  # gpu_memory_utilization (CPU backend: share of RAM)
    max_model_len: int | None = Field(None, gt=0)
    enforce_eager: bool = True
    startup_timeout: float = Field(900.0, gt=0)
    engine_args: dict[str, Any] = {}  # passed to vllm.LLM(...) as they are
    # How a particle reaches the engine. in_engine: the engine's process holds the basis and sums
    # each particle into its own weight tensors (only coefficients cross the pipe); shared_file:
    # summed here into a file in /dev/shm that vLLM reloads (redoing any repacking); auto: in_engine
    # where the engine computes with its weights as loaded (checked at start), else shared_file.
    # Both give the engine the same bits, so the choice is not part of the cache key.
    weight_update: WeightUpdate = "auto"
    # vLLM's CPU backend only. packed (vLLM's default): linear weights repacked for oneDNN/AMX, so
    # particles go through the shared file. plain: torch F.linear on the weights as loaded (vLLM's
    # own fallback), which lets in_engine run on a CPU; other GEMM kernels, so part of the cache key.
    cpu_linear: Literal["packed", "plain"] = "packed"


class VLLMSettings(_Decoding):
    """A vLLM engine in its own process; particles are pushed into it in place."""

    backend: Literal["vllm"] = "vllm"
    vllm: VLLMEngineSettings = VLLMEngineSettings()

    def cache_config(self) -> dict:
        # cpu_linear only where it is not the default: the keys of existing scores stay as they were
        plain = {"cpu_linear": "plain"} if self.vllm.cpu_linear == "plain" else {}
        return {"backend": self.backend, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop),
                "greedy": True, "dtype": self.vllm.dtype, **plain}


GenerationSettings = tagged_union({"transformers": TransformersSettings, "vllm": VLLMSettings}, key="backend",
                                  default="transformers")
