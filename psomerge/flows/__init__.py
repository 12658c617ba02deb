"""Prefect flows: pso_merge, promote.

Importing this package first applies psomerge's Prefect defaults (see settings.py): they
must be in the environment before Prefect itself is imported.
"""

from psomerge.flows.settings import apply_defaults

apply_defaults()
