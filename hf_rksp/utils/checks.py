"""Checks of single values given by a user (counts, devices, repo ids, revisions, memory sizes), worded in
library terms: each raises ConfigError naming its parameter."""

from __future__ import annotations

import math
import re

from hf_rksp.errors import ConfigError, SecretError
from hf_rksp.utils import secrets

#: the most calibration tokens an audit takes (2^24: 8 times a 7B model's hidden size squared in tokens
#: would already be hours of forward passes on a CPU; the paper uses 2048)
MAX_TOKENS = 2**24


#: the largest seed torch's generators take
MAX_SEED = 2**63 - 1


#: the most sequences per forward batch
MAX_BATCH = 2**16


#: DEVICE=SIZE sizes accelerate's max_memory understands (convert_file_size_to_int)
SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?$", re.IGNORECASE)


DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?|mps)$")


#: git ref names the Hub accepts as a revision: no spaces, control characters, '..', '~^:?*[\\' or '@{'
BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[/.-]|[/.]$|\.lock$")


def check_int(name: str, value, lo: int, hi: int) -> None:
    """``value`` is an integer in [lo, hi] (bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise ConfigError(f"must be between {lo} and {hi}, got {value}", param=name)


def check_positive_float(name: str, value) -> None:
    """``value`` is a finite number > 0 (NaN and infinity are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"must be a finite positive number, got {value!r}", param=name)


def check_device(name: str) -> None:
    """cpu, cuda, cuda:N, mps or auto; ``meta`` holds no data and cannot run a forward pass."""
    if not isinstance(name, str) or not DEVICE.match(name):
        raise ConfigError(f"must be cpu, cuda, cuda:N, mps or auto, got {name!r}", param="device")


def check_no_secret(value, param: str, tokens=None) -> None:
    """``value`` (a string the user gave that ends up in a repo id, revision, name, title, path or file) holds
    no Hugging Face token: token-shaped or an active one (``tokens``; None: ``secrets.active_tokens()``).
    The refusal names ``param``, never the value."""
    if isinstance(value, str) and secrets.has_secret(value, tokens):
        raise SecretError(f"looks like {secrets.WHAT}: refused, so that it is never published or printed "
                          "(give the token through HF_TOKEN or hf auth login only)", param=param)


def check_hub_id(value: str, param: str) -> None:
    """A Hub repo id (``name`` or ``org/name``): it names files and folders, so '..' or a newline is refused,
    and so is a token (:func:`check_no_secret`)."""
    check_no_secret(value, param)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise ConfigError(f"must be a Hub repo id like org/name: {str(e).splitlines()[0][:200]}", param=param) from None


def check_repo_id(value: str, param: str = "repo_id") -> None:
    """A repo to push to: a Hub repo id of the form USER/NAME (and no token, :func:`check_hub_id`)."""
    check_hub_id(value, param)
    if value.count("/") != 1:
        raise ConfigError(f"must look like USER/NAME, got {value!r}", param=param)


def check_revision(value: str | None, param: str = "revision") -> None:
    """A branch, tag or commit the Hub can take (git's ref-name rules, as the real push applies them)."""
    if value is None:
        return
    check_no_secret(value, param)
    if not value or len(value) > 255 or BAD_REF.search(value):
        raise ConfigError(f"is not a valid branch, tag or commit name: {value!r}", param=param)


def parse_max_memory(text: str) -> dict:
    """'cuda:0=20GiB,cpu=30GiB' -> accelerate's max_memory dict ({0: '20GiB', 'cpu': '30GiB'})."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        dev, sep, size = part.partition("=")
        dev, size = dev.strip(), size.strip()
        if not sep or not size:
            raise ConfigError(f"entries look like DEVICE=SIZE (e.g. cuda:0=20GiB), got {part!r}", param="max_memory")
        key = int(dev.split(":", 1)[1]) if dev.startswith("cuda:") and dev[5:].isdigit() else dev
        if key not in ("cpu", "disk") and not isinstance(key, int):
            raise ConfigError(f"device must be cpu, disk or cuda:N, got {dev!r}", param="max_memory")
        if not SIZE.match(size):
            raise ConfigError(f"size must be a number with a unit like 20GiB or 500MB, got {size!r}",
                              param="max_memory")
        out[key] = size
    if not out:
        raise ConfigError(f"names no device, got {text!r}", param="max_memory")
    return out

