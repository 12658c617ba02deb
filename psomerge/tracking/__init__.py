"""MLflow tracking and the model registry (the only room importing MLflow)."""

from psomerge.tracking.tracker import MLflowTracker

__all__ = ["MLflowTracker"]
