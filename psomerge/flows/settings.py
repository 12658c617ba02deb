"""Quiet, local defaults for Prefect, applied before Prefect is imported.

With no PREFECT_API_URL, Prefect starts a temporary local server (SQLite) for the process;
PREFECT_HOME and result storage go under psomerge's data directory, not ~/.prefect.
Anything already set in the environment wins.
"""

from __future__ import annotations

import os

from psomerge.paths import data_dir


def apply_defaults() -> None:
    home = data_dir() / "prefect"
    defaults = {
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Prefect creates only the last path component of its home
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
