"""MLflow tracking and model registry (imported only by the orchestration layer)."""
