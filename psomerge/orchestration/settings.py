"""The environment defaults of psomerge's entry points, in one table (this module imports
nothing of Prefect: it must run before Prefect is imported, which reads its settings then).

The command line (and tests, benchmarks) call ``apply_defaults()`` once at start. A value
already in the environment wins, so pointing psomerge at a real Prefect or MLflow server
stays one variable away (``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import os
from pathlib import Path

from psomerge.paths import data_dir


def defaults(home: Path | None = None) -> dict[str, str]:
    prefect_home = (home or data_dir()) / "prefect"
    return {
        # offline: no model hub lookups (they take ~25 s to fail without a network)
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # no telemetry from MLflow, Prefect or anything honouring DO_NOT_TRACK
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Prefect: a temporary local server per process, its home and results under the data dir
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(prefect_home / "storage"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }


def apply_defaults() -> None:
    """Set every default not already set, and create Prefect's home (Prefect creates only
    the last component of that path)."""
    for key, value in defaults().items():
        os.environ.setdefault(key, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
