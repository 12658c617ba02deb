"""Where psomerge keeps what it builds and caches."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "PSOMERGE_HOME"


def data_dir() -> Path:
    """``$PSOMERGE_HOME``, else ``.psomerge`` under the working directory."""
    return Path(os.environ.get(ENV_HOME) or Path.cwd() / ".psomerge")
