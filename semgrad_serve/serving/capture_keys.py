"""Capture keys: minted by the API server for the requests it scores, trusted by the capture connector only then.

A key is a random nonce and its HMAC-SHA256 under a secret the API server and
vLLM's engine share through the environment (``SEMGRAD_SERVE_CAPTURE_SECRET``;
``semgrad-serve serve`` sets a fresh one at each start, and vLLM's processes
inherit it). The connector keeps and records a request only where its key
verifies, so a key a client wrote itself, or one that reached the engine by
another front end, makes the worker hold nothing. Without a secret nothing is
captured and scoring recomputes prompts. Standard library only: ``serve`` imports
it before vLLM starts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Mapping

SECRET_ENV = "SEMGRAD_SERVE_CAPTURE_SECRET"
NONCE_BYTES = 16
TAG_BYTES = 16  # of the HMAC-SHA256, kept: 128 bits to guess
KEY_LENGTH = 2 * (NONCE_BYTES + TAG_BYTES)  # hex characters
CHECK_LABEL = b"semgrad-capture-secret-check"


def new_secret() -> str:
    """A fresh secret for ``SECRET_ENV``."""
    return secrets.token_hex(32)


def secret_from_env(env: Mapping[str, str] = os.environ) -> bytes | None:
    """The shared secret, None where it is not set (then nothing is captured)."""
    value = env.get(SECRET_ENV, "")
    return value.encode() if value else None


def _tag(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()[: 2 * TAG_BYTES]


def mint(secret: bytes) -> str:
    """A new key: a random nonce followed by its tag."""
    nonce = secrets.token_hex(NONCE_BYTES)
    return nonce + _tag(secret, nonce)


def verify(secret: bytes | None, key: object) -> bool:
    """Whether ``key`` was minted under ``secret`` (never where there is no secret)."""
    if secret is None or not isinstance(key, str) or len(key) != KEY_LENGTH:
        return False
    nonce, tag = key[: 2 * NONCE_BYTES], key[2 * NONCE_BYTES :]
    return hmac.compare_digest(_tag(secret, nonce), tag)


def fingerprint(secret: bytes) -> str:
    """What the worker tells the API server so that both can check they hold the same secret without sending it."""
    return hmac.new(secret, CHECK_LABEL, hashlib.sha256).hexdigest()
