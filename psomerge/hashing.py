"""Content digests for cache keys and fingerprints: one serialisation, one hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(payload: Any, size: int = 16) -> str:
    """blake2b of ``payload``: a string as it is, anything else as sorted-key JSON."""
    data = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True)
    return hashlib.blake2b(data.encode(), digest_size=size).hexdigest()
