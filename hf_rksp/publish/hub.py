"""Hub: publish an audit (JSON, plots, card) in one commit with huggingface_hub.

Two destinations:
- ``mode="own"``: the user's audit repo; the card becomes its README.md.
- ``mode="model-pr"``: a pull request to the audited model's repo, files under
  ``rksp/``; the model's own README is never touched.

The token comes from ``HF_TOKEN`` or the cached login and is scrubbed from
every message this module raises.  The plan holds the exact bytes to be
sent, read once; they are scanned for the active token and token-shaped
strings (``hf_rksp.utils.secrets``) before the plan exists, so a dry run
refuses what the real push would refuse, naming the file, never the value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from hf_rksp.errors import OutputError, RKSPError, SecretError
from hf_rksp.record.records import AuditRecord, read_audit
from hf_rksp.utils.checks import (
    check_hub_id,
    check_no_secret,
    check_repo_id,
    check_revision,
)
from hf_rksp.utils.hub_errors import hub_error
from hf_rksp.utils.secrets import WHAT, active_tokens, has_secret, has_secret_bytes

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
    contents: dict[str, bytes] = field(default_factory=dict)  # path in repo -> the exact bytes sent (read once)

    def data(self, path: str) -> bytes:
        """The bytes that go to ``path`` in the repo: those read (and scanned) when planning."""
        return self.contents[path] if path in self.contents else self.files[path].read_bytes()

    def describe(self) -> str:
        lines = [
            f"repo      {self.repo_id} ({'new or existing audit repo' if self.mode == 'own' else 'audited model repo'})",
            f"revision  {self.revision or 'main'}" + ("  (as a pull request)" if self.create_pr else ""),
            f"commit    {self.commit_message}",
            "files:",
        ]
        for path, local in self.files.items():
            data = self.data(path)
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
    """Everything a push would upload, after validating the audit JSON against the schema.

    Every string given and every byte to be sent is checked for a Hugging Face token first
    (:func:`refuse_secrets`): a hit is a SecretError naming the parameter or the file, never the value.
    """
    tokens = active_tokens()
    check_no_secret(str(slug_or_dir), "slug_or_dir", tokens)
    check_no_secret(str(out_dir), "out_dir", tokens)
    if repo_id is not None:
        check_hub_id(repo_id, "repo_id")
    check_revision(revision)
    audit_dir, card_dir, audit = locate_audit(slug_or_dir, out_dir)
    if mode == "model-pr":
        if repo_id is None:
            if audit.source.kind != "hub":
                raise RKSPError("`to_model` needs `repo_id`: the audited model was not a hub id")
            if has_secret(audit.source.id, tokens):
                raise SecretError(f"{audit_dir / 'audit.json'} holds {WHAT} as its source id: refusing to push; "
                                  "nothing was uploaded", path=str(audit_dir / "audit.json"))
            repo_id = audit.source.id
        prefix, create_pr = "rksp/", True
    elif mode == "own":
        if repo_id is None:
            raise RKSPError("`repo_id` USER/NAME is required (or `to_model` to open a PR on the audited model)")
        prefix = ""
    else:
        raise ValueError(f"unknown push mode {mode!r}")
    check_repo_id(repo_id, "repo_id")
    files = {prefix + f: audit_dir / f for f in AUDIT_FILES}
    files[prefix + "README.md"] = card_dir / "README.md"
    what = audit.source.id + (" at init" if audit.source.init else "")
    plan = PushPlan(repo_id=repo_id, mode=mode, revision=revision, create_pr=create_pr, private=private,
                    files=files, commit_message=f"RKSP audit of {what} (hf-rksp {audit.environment.hf_rksp})")
    plan.contents = {path: _read(local) for path, local in files.items()}
    refuse_secrets(plan, tokens)
    return plan


def _read(local: Path) -> bytes:
    """A file to upload, not through a link (its bytes would come from outside the audit's folders)."""
    if local.is_symlink() or local.parent.is_symlink():
        link = local if local.is_symlink() else local.parent
        raise OutputError(f"{link} is a symbolic link: push sends only real files of the audit's folders "
                          "(replace the link by the file)")
    return local.read_bytes()


def refuse_secrets(plan: PushPlan, tokens=None) -> None:
    """Scan everything ``plan`` sends (each file's bytes, the commit message, the repo id and revision) for
    the active tokens (None: ``secrets.active_tokens()``) and token-shaped strings; a hit is a SecretError
    naming the file, never the value (nothing is uploaded)."""
    tokens = active_tokens() if tokens is None else tokens
    for path, local in plan.files.items():
        if has_secret_bytes(plan.data(path), tokens):
            raise SecretError(f"{local} holds {WHAT}: refusing to push it; nothing was uploaded "
                              "(remove it from the file, e.g. re-audit with another `name`)", path=str(local))
    if has_secret(plan.commit_message, tokens):  # the audit's source id; audit.json holds it too
        raise SecretError(f"the commit message (the source id of the audit) holds {WHAT}: refusing to push; "
                          "nothing was uploaded", path="audit.json")
    check_no_secret(plan.repo_id, "repo_id", tokens)
    check_no_secret(plan.revision, "revision", tokens)


def unchecked(plan: PushPlan) -> str:
    """What a dry run cannot check without sending a request, in one line: the network, and whether the
    token may write to the repo (whether a token is set at all is checked, locally)."""
    from huggingface_hub import get_token

    token = "a token is set" if get_token() else \
        "no token is set (HF_TOKEN or `hf auth login`), so the real push would stop there"
    return (f"not checked (it needs the network): that the Hub can be reached and that the token may write to "
            f"{plan.repo_id}{' (open a pull request)' if plan.mode != 'own' or plan.create_pr else ''}; {token}")


def push(plan: PushPlan, *, token: str | None = None, endpoint: str | None = None) -> PushResult:
    """Upload ``plan`` as a single commit (or PR); creates the audit repo when missing (own mode)."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import OfflineModeIsEnabled

    token = token or get_token()
    if not token:
        raise RKSPError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    refuse_secrets(plan, (*active_tokens(), token))  # a plan built by hand, or changed since: scanned again
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=plan.data(p)) for p in plan.files]
    try:
        if plan.mode == "own":
            api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        info = api.create_commit(
            plan.repo_id, ops, commit_message=plan.commit_message, revision=plan.revision, create_pr=plan.create_pr
        )
    except OfflineModeIsEnabled:
        raise RKSPError("HF_HUB_OFFLINE is set: unset it to push; nothing was uploaded") from None
    except Exception as e:
        # not chained: the client's own exception may quote the request, token included
        raise hub_error(e, repo_id=plan.repo_id, action="upload", revision=plan.revision, token=token) from None
    return PushResult(plan=plan, commit_url=info.commit_url, pr_url=info.pr_url)
