"""Hub: publish an audit (JSON, plots, card) in one commit with huggingface_hub.

Two destinations:
- ``mode="own"``: the user's audit repo; the card becomes its README.md.
- ``mode="model-pr"``: a pull request to the audited model's repo, files under
  ``rksp/``; the model's own README is never touched.

The token comes from ``HF_TOKEN`` or the cached login and is scrubbed from
every message this module raises.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from hf_rksp.errors import ConfigError, RKSPError
from hf_rksp.record.records import AuditRecord, read_audit
from hf_rksp.utils.checks import check_hub_id, check_revision

AUDIT_FILES = ("audit.json", "spectrum.png", "profile.png")


@dataclass
class PushPlan:
    repo_id: str
    mode: str
    revision: str | None
    create_pr: bool
    private: bool
    files: dict[str, Path] = field(default_factory=dict)  # path in repo -> local file
    commit_message: str = ""

    def describe(self) -> str:
        lines = [
            f"repo      {self.repo_id} ({'new or existing audit repo' if self.mode == 'own' else 'audited model repo'})",
            f"revision  {self.revision or 'main'}" + ("  (as a pull request)" if self.create_pr else ""),
            f"commit    {self.commit_message}",
            "files:",
        ]
        for path, local in self.files.items():
            data = local.read_bytes()
            lines.append(f"  {path:<22} {len(data):>9} bytes  sha256 {hashlib.sha256(data).hexdigest()[:16]}  <- {local}")
        return "\n".join(lines)


@dataclass
class PushResult:
    plan: PushPlan
    commit_url: str | None = None
    pr_url: str | None = None


def locate_audit(slug_or_dir: str, out_dir: str | Path = ".") -> tuple[Path, Path, AuditRecord]:
    """(audit dir, card dir, its read audit) for a slug under ``out_dir``, or for an audit directory path."""
    p = Path(slug_or_dir)
    if p.is_dir() and (p / "audit.json").is_file():
        audit_dir = p
        card_dir = p.parent.parent / "model_cards" / p.name
    else:
        audit_dir = Path(out_dir) / "audits" / slug_or_dir
        card_dir = Path(out_dir) / "model_cards" / slug_or_dir
    if not (audit_dir / "audit.json").is_file():
        raise RKSPError(f"no audit found for {slug_or_dir!r} (looked for {audit_dir / 'audit.json'})")
    audit = read_audit(audit_dir / "audit.json")  # a damaged audit says so, before what else is missing
    missing = [str(audit_dir / f) for f in AUDIT_FILES if not (audit_dir / f).is_file()]
    if not (card_dir / "README.md").is_file():
        missing.append(str(card_dir / "README.md"))
    if missing:
        raise RKSPError(f"audit {slug_or_dir!r} is incomplete, missing: {', '.join(missing)}")
    return audit_dir, card_dir, audit


def plan_push(
    slug_or_dir: str,
    repo_id: str | None = None,
    *,
    mode: str = "own",
    revision: str | None = None,
    create_pr: bool = False,
    private: bool = False,
    out_dir: str | Path = ".",
) -> PushPlan:
    """Everything a push would upload, after validating the audit JSON against the schema."""
    if repo_id is not None:
        check_hub_id(repo_id, "repo_id")
    check_revision(revision)
    audit_dir, card_dir, audit = locate_audit(slug_or_dir, out_dir)
    if mode == "model-pr":
        if repo_id is None:
            if audit.source.kind != "hub":
                raise RKSPError("--to-model needs --repo-id: the audited model was not a hub id")
            repo_id = audit.source.id
        prefix, create_pr = "rksp/", True
    elif mode == "own":
        if repo_id is None:
            raise RKSPError("--repo-id USER/NAME is required (or --to-model to open a PR on the audited model)")
        prefix = ""
    else:
        raise ValueError(f"unknown push mode {mode!r}")
    check_hub_id(repo_id, "repo_id")
    if repo_id.count("/") != 1:
        raise ConfigError(f"must look like USER/NAME, got {repo_id!r}", param="repo_id")
    files = {prefix + f: audit_dir / f for f in AUDIT_FILES}
    files[prefix + "README.md"] = card_dir / "README.md"
    what = audit.source.id + (" at init" if audit.source.init else "")
    return PushPlan(repo_id=repo_id, mode=mode, revision=revision, create_pr=create_pr, private=private,
                    files=files, commit_message=f"RKSP audit of {what} (hf-rksp {audit.environment.hf_rksp})")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _hub_error(e: Exception, plan: PushPlan, token: str | None) -> RKSPError:
    """One clear line per failure class; the token never appears in it."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, RevisionNotFoundError):
        msg = f"revision {plan.revision!r} not found in {plan.repo_id}"
    elif isinstance(e, RepositoryNotFoundError) or status == 404:
        msg = f"repo {plan.repo_id} not found, or your token cannot see it"
    elif status in (401, 403):
        msg = f"no write access to {plan.repo_id} with this token (HTTP {status})"
    elif status == 429:
        msg = "rate limited by the Hub (HTTP 429); wait and retry"
    elif isinstance(e, HfHubHTTPError):
        msg = f"the Hub refused the upload (HTTP {status}): {str(e).splitlines()[0]}"
    elif isinstance(e, (ConnectionError, OSError)) or "connect" in type(e).__name__.lower():
        msg = f"cannot reach the Hub ({type(e).__name__}); check the network or HF_ENDPOINT"
    else:
        msg = f"push failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return RKSPError(_scrub(msg + "; nothing was uploaded", token))


def push(plan: PushPlan, *, token: str | None = None, endpoint: str | None = None) -> PushResult:
    """Upload ``plan`` as a single commit (or PR); creates the audit repo when missing (own mode)."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import OfflineModeIsEnabled

    token = token or get_token()
    if not token:
        raise RKSPError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in plan.files.items()]
    try:
        if plan.mode == "own":
            api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        info = api.create_commit(
            plan.repo_id, ops, commit_message=plan.commit_message, revision=plan.revision, create_pr=plan.create_pr
        )
    except OfflineModeIsEnabled:
        raise RKSPError("HF_HUB_OFFLINE is set: unset it to push; nothing was uploaded") from None
    except Exception as e:
        raise _hub_error(e, plan, token) from None
    return PushResult(plan=plan, commit_url=info.commit_url, pr_url=info.pr_url)
