"""Prefect flows and tasks around the pipeline (the only room importing Prefect).

Prefect reads its settings from the environment when it is first imported: entry points
call ``psomerge.orchestration.settings.apply_defaults()`` (which imports nothing of Prefect)
before importing the flows.
"""
