"""Credentials where a config holds other values: a key pasted where a variable's name
belongs, a URL carrying a password or a token, a command-line flag followed by a key.

Configs refuse them where a field names its purpose (a judge's ``api_key_env`` and
``base_url``); what is recorded anyway (MLflow params: every config value, free-form
command lines and addresses included) goes through ``redact`` first.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
_KEY_PREFIX = re.compile(r"(sk|pk|rk|hf|ghp|gho|ghs|ghu|gsk|xai|glpat|xox[abpr])[-_]|AIza")  # as issuers write them
_SECRET_QUERY = re.compile(r"key|token|secret|passw|sig|auth", re.IGNORECASE)
_SECRET_FLAG = re.compile(r"(key|token|secret|passw(or)?d|credentials?)$", re.IGNORECASE)


def looks_like_a_key(value: str) -> bool:
    """Long, and an issuer's key prefix or a mix of upper case, lower case and digits: how keys
    look, not variable names (HF_TOKEN, OPENAI_API_KEY, my_key pass)."""
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value) and \
        sum(c.isdigit() for c in value) >= 2
    return len(value) >= 20 and (bool(_KEY_PREFIX.match(value)) or mixed)


def url_credentials(url: str) -> str | None:
    """What credentials ``url`` carries (in words), or None."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return "credentials (user:password@host)"
    if any(_SECRET_QUERY.search(k) for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return "a key or token in its query string"
    return None


def redact(value: Any) -> Any:
    """``value`` (a config as plain data) with every credential replaced by ``***``: keys,
    the user and password of URLs, secret query parameters, and what follows a secret flag in
    a command line (``--api-key K``, ``--token=K``)."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for item in value:
            secret_flag = bool(out) and isinstance(out[-1], str) and _is_secret_flag(out[-1])
            out.append(REDACTED if secret_flag and isinstance(item, str) else redact(item))
        return out
    if not isinstance(value, str):
        return value
    if _is_secret_flag(flag := value.split("=", 1)[0]) and "=" in value:
        return f"{flag}={REDACTED}"
    if looks_like_a_key(value):
        return REDACTED
    if "://" in value and url_credentials(value):
        return _redact_url(value)
    return value


def _is_secret_flag(item: str) -> bool:
    return item.startswith("-") and bool(_SECRET_FLAG.search(item.lstrip("-")))


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username is not None or parts.password is not None:
        netloc = f"{REDACTED}@{netloc}"
    query = urlencode([(k, REDACTED if _SECRET_QUERY.search(k) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
