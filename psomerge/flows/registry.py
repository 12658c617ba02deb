"""Small flows around the registry: promote a candidate, evaluate a registered model."""

from __future__ import annotations

from typing import Any

from prefect import flow

from psomerge.registry import tracking


@flow(name="promote")
def promote(model_name: str, margin: float = 0.0, experiment: str = "psomerge") -> dict[str, Any]:
    """Move alias ``champion`` to ``candidate`` only if its held-out score is higher by > margin."""
    tracking.configure(experiment)
    return tracking.promote(model_name, margin)
