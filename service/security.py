"""API keys: random bearer tokens, stored only as their sha256.

The keys carry 256 bits of randomness, so a plain sha256 is enough to make a stolen database
useless for authentication (a slow password hash protects low-entropy secrets, not these).
"""

from __future__ import annotations

import hashlib
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
