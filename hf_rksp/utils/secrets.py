"""The one Hugging Face token detector: token-shaped strings and the tokens this machine holds, and redaction.

Two kinds of secret are looked for, everywhere hf-rksp prints, logs, writes or uploads:

- a **token-shaped** string: ``hf_`` followed by 30 or more token characters (letters and digits; a
  Hugging Face user access token is ``hf_`` + 34 of them), whoever's token it is;
- an **active** token: ``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``), the login huggingface_hub
  stored (``get_token``, and every named token of ``get_stored_tokens``), whatever its shape.  Values
  shorter than :data:`MIN_ACTIVE` characters are not treated as secrets (they would match ordinary words).

Values are compared, never printed: no function here returns a token except :func:`active_tokens`, and
messages built from a hit name the parameter or the file only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from contextlib import suppress

#: ``hf_`` + 30 or more token characters (not preceded by one, so ``xhf_...`` inside a word still counts
#: only from its ``hf_``; a longer run of token characters is one match)
TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{30,}")
TOKEN_SHAPE_BYTES = re.compile(TOKEN_SHAPE.pattern.encode())

#: an active token shorter than this is not looked for (HF_TOKEN=x would otherwise match every "x")
MIN_ACTIVE = 8

#: what a redacted secret reads as
MASK = "hf_***"

#: what a refusal says a secret looks like (no value in it)
WHAT = "a Hugging Face access token (hf_ + 30 or more letters/digits, or this machine's token)"


def active_tokens() -> tuple[str, ...]:
    """The tokens this process could authenticate with: ``HF_TOKEN``/``HUGGING_FACE_HUB_TOKEN`` and
    huggingface_hub's stored login (its public ``get_token`` and ``get_stored_tokens``), longest first.

    A short-lived CI token (``HF_OIDC_RESOURCE``) is minted by a network exchange and cannot have been typed:
    it is not fetched here.  Never print what this returns.
    """
    found = {os.environ.get(k, "").strip() for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    with suppress(Exception):  # an unreadable login file holds no token to look for; a push reports it
        from huggingface_hub import get_token

        if not os.environ.get("HF_OIDC_RESOURCE"):
            found.add((get_token() or "").strip())
    with suppress(Exception):
        from huggingface_hub.utils import get_stored_tokens

        found.update(t.strip() for t in get_stored_tokens().values() if isinstance(t, str))
    return tuple(sorted((t for t in found if len(t) >= MIN_ACTIVE), key=len, reverse=True))


def _tokens(tokens: Iterable[str] | None) -> tuple[str, ...]:
    return active_tokens() if tokens is None else tuple(t for t in tokens if t and len(t) >= MIN_ACTIVE)


def has_secret(text: str, tokens: Iterable[str] | None = None) -> bool:
    """Whether ``text`` holds a token-shaped string or one of ``tokens`` (None: :func:`active_tokens`)."""
    if not isinstance(text, str):
        return False
    return bool(TOKEN_SHAPE.search(text)) or any(t in text for t in _tokens(tokens))


def has_secret_bytes(data: bytes, tokens: Iterable[str] | None = None) -> bool:
    """:func:`has_secret` for the bytes of a file (the active tokens as UTF-8)."""
    return bool(TOKEN_SHAPE_BYTES.search(data)) or any(t.encode() in data for t in _tokens(tokens))


def redact(text: str, tokens: Iterable[str] | None = None) -> str:
    """``text`` with every active token and every token-shaped string replaced by :data:`MASK`."""
    for t in _tokens(tokens):
        text = text.replace(t, MASK)
    return TOKEN_SHAPE.sub(MASK, text)
