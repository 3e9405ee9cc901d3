"""The one place a Hugging Face Hub failure (download or upload) becomes a :class:`~hf_rksp.errors.HubError`.

One line per failure class, in library terms; the token (given, or active) and any token-shaped string never
appear in it (``hf_rksp.utils.secrets.redact``).  The original
exception stays chained (``raise hub_error(...) from e``), so its traceback reaches the debug log.
"""

from __future__ import annotations

import errno

from hf_rksp.errors import HubError
from hf_rksp.utils.secrets import active_tokens, redact

INDEX = "model.safetensors.index.json"


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else repr(e)


def offline() -> bool:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE, read when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_error(e: Exception, *, repo_id: str, action: str, revision: str | None = None, filename: str | None = None,
              token: str | None = None) -> HubError:
    """``action``: ``"load"`` (a model's config or weights), ``"download"`` (one file of a checkpoint being
    streamed) or ``"upload"`` (a push)."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    status = getattr(getattr(e, "response", None), "status_code", None)
    if action == "upload":
        if isinstance(e, RevisionNotFoundError):
            msg = f"revision {revision!r} not found in {repo_id}"
        elif isinstance(e, RepositoryNotFoundError) or status == 404:
            msg = f"repo {repo_id} not found, or your token cannot see it"
        elif status in (401, 403):
            msg = f"no write access to {repo_id} with this token (HTTP {status})"
        elif status == 429:
            msg = "rate limited by the Hub (HTTP 429); wait and retry"
        elif isinstance(e, HfHubHTTPError):
            msg = f"the Hub refused the upload (HTTP {status}): {str(e).splitlines()[0]}"
        elif isinstance(e, (ConnectionError, OSError)) or "connect" in type(e).__name__.lower():
            msg = f"cannot reach the Hub ({type(e).__name__}); check the network or HF_ENDPOINT"
        else:
            msg = f"push failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        msg += "; nothing was uploaded"
    elif action == "download":
        if isinstance(e, EntryNotFoundError):
            msg = f"{filename} is listed in {repo_id}'s {INDEX} but missing from the repo"
        elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
            msg = (f"no space left on the disk while downloading {filename} of {repo_id} into the Hugging Face "
                   "cache; free space, point HF_HOME elsewhere, or set `low_disk` (one shard at a time)")
        else:
            msg = f"could not download {filename} of {repo_id}: {_first_line(e)}"
    else:
        if isinstance(e, GatedRepoError):
            msg = f"{repo_id} is a gated repo: accept its license on the Hub and log in (hf auth login)"
        elif isinstance(e, RevisionNotFoundError):
            msg = f"revision {revision!r} not found for {repo_id}"
        elif isinstance(e, RepositoryNotFoundError):
            msg = f"model {repo_id!r} not found on the Hub (or it is private and you are not logged in)"
        else:
            where = "the local Hugging Face cache" + (" (HF_HUB_OFFLINE is set)" if offline() else
                                                      " or the Hub (no network?)")
            msg = f"could not load {repo_id!r} from {where}: {str(e).splitlines()[0]}"
    msg = redact(msg, (*active_tokens(), *((token,) if token else ())))
    return HubError(msg, repo_id=repo_id, filename=filename, revision=revision)
