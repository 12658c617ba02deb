"""Prefect tasks: thin wrappers that call the library and add caching, retries, concurrency.

Only small things cross task boundaries: the run config as JSON, coefficient lists, paths
and fingerprints. Each worker process builds its own Workspace (basis, resident models) on
first use and keeps it for later tasks of the same config.
"""

from psomerge.flows.settings import apply_defaults

apply_defaults()  # before Prefect is imported
