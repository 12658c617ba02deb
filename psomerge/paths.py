"""Where psomerge keeps what it builds and caches, and where its environments live."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_HOME = "PSOMERGE_HOME"


def data_dir() -> Path:
    """``$PSOMERGE_HOME``, else ``.psomerge`` under the working directory."""
    return Path(os.environ.get(ENV_HOME) or Path.cwd() / ".psomerge")


def sibling_venv(name: str) -> Path:
    """A virtual environment beside the one running psomerge (``make`` builds ``.venv`` and
    ``.venv-vllm`` side by side), independent of the working directory."""
    return Path(sys.prefix).parent / name
