"""The vLLM environment: vLLM's pins clash with Prefect's (FastAPI), so it lives in its own
virtual environment (``make vllm-env`` builds ``.venv-vllm`` beside ``.venv``) and psomerge
runs its Python as a separate process (a generation engine, or a judge server)."""

from __future__ import annotations

import os
from pathlib import Path

from psomerge.paths import sibling_venv
from psomerge.errors import ConfigError

ENV_PYTHON = "PSOMERGE_VLLM_PYTHON"


def vllm_python(configured: str | Path | None = None) -> Path:
    """The vLLM environment's interpreter: as configured, else $PSOMERGE_VLLM_PYTHON, else
    ``.venv-vllm/bin/python`` beside the environment running psomerge."""
    python = Path(configured or os.environ.get(ENV_PYTHON) or sibling_venv(".venv-vllm") / "bin" / "python")
    if not python.exists():
        raise ConfigError(f"vLLM environment not found at {python}: run `make vllm-env` first "
                          f"(or set {ENV_PYTHON} / the config's `python` key)")
    return python


def vllm_env() -> dict[str, str]:
    """Environment for a vLLM process: offline and no usage reports unless this process's
    environment says otherwise (a value already set wins, as for every default psomerge sets).
    The platform (CPU or GPU) is vLLM's own choice from the build installed in its environment."""
    return {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", **os.environ}
