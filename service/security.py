"""API keys: random bearer tokens, stored only as their sha256.

The keys carry 256 bits of randomness, so a plain sha256 is enough to make a stolen database
useless for authentication (a slow password hash protects low-entropy secrets, not these).
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "qdpo_sk_"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 4]


def new_id(prefix: str) -> str:
    """Public object ids: `job_3f9c…`; random, so they leak nothing about other tenants' activity."""
    return f"{prefix}_{secrets.token_hex(12)}"


_PUBLIC_ID = re.compile(r"([a-z]{1,10})_[0-9a-f]{1,64}")


def looks_like_id(value: str, prefix: str | None = None) -> bool:
    """Whether `value` has the shape of a public id (of `prefix`, when given).

    Checked before any lookup: text that cannot be an id (NUL, odd characters, a megabyte) never
    reaches the database, and is answered exactly like an id that does not exist.
    """
    match = _PUBLIC_ID.fullmatch(value) if isinstance(value, str) else None
    return match is not None and (prefix is None or match.group(1) == prefix)
