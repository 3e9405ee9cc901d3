"""`hf-rksp push` through the real huggingface_hub client against a local fake Hub (127.0.0.1)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
from fakehub import FakeHub

from hf_rksp import audit
from hf_rksp.cli.commands import main

SLUG = ""  # the slug of the audit the `audited` fixture writes

TOKEN = "hf_testtoken_3f9a7c1e5b"


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_dirs) -> Path:
    out = tmp_path_factory.mktemp("pushable")
    global SLUG
    SLUG = audit(str(tiny_dirs["gpt2"]), init=True, tokens=256, seq_len=128, out_dir=str(out),
                 progress=False).record.slug
    return out


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Point the real client at the fake Hub; the token comes from HF_TOKEN as for a user."""

    def use(hub: FakeHub | None, token: str | None = TOKEN, endpoint: str | None = None):
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint or hub.endpoint)
        monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no_cached_login"))
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)

    return use


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def expected_files(out: Path, slug: str, prefix: str = "") -> dict[str, bytes]:
    a, c = out / "audits" / slug, out / "model_cards" / slug
    return {
        prefix + "audit.json": (a / "audit.json").read_bytes(),
        prefix + "spectrum.png": (a / "spectrum.png").read_bytes(),
        prefix + "profile.png": (a / "profile.png").read_bytes(),
        prefix + "README.md": (c / "README.md").read_bytes(),
    }


def assert_no_token(hub: FakeHub, out: Path, *texts: str):
    for t in texts:
        assert TOKEN not in t
    for p in out.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    for c in hub.commits:
        for content in c["files"].values():
            assert TOKEN.encode() not in content


def test_push_own_repo_one_commit(capsys, audited, online):
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        online(hub)
        rc, out, err = run(capsys, "push", SLUG, "--repo-id", "alice/audits", "--out-dir", str(audited))
    assert rc == 0, err
    assert "alice/audits" in hub.repos
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == "alice/audits" and commit["revision"] == "main" and not commit["create_pr"]
    assert commit["files"] == expected_files(audited, SLUG)
    card = commit["files"]["README.md"].decode()
    assert "model-index" in card and "near_unit_mass" in card
    assert "1 commit" in out or "one commit" in out
    assert_no_token(hub, audited, out, err)
    # the token travelled only in the Authorization header, on every request of ours; huggingface_hub >= 2.4 may
    # also fetch its AI-agent registry (/api/agent-harnesses, best-effort telemetry when an agent's environment
    # variable is set), without the header: that request carries no token, which is what matters here
    for r in hub.requests:
        if r["path"] == "/api/agent-harnesses":
            assert "hf_" not in str(r["headers"]), r["path"]
            continue
        auth = {k.lower(): v for k, v in r["headers"].items()}.get("authorization")
        assert auth == f"Bearer {TOKEN}", (r["path"], auth)


def test_push_as_pr_to_model_repo(capsys, audited, online):
    with FakeHub(tokens={TOKEN: {"alice"}}, repos={"someorg/tiny-model"}) as hub:
        online(hub)
        rc, out, err = run(capsys, "push", str(audited / "audits" / SLUG), "--to-model",
                           "--repo-id", "someorg/tiny-model")
    assert rc == 0, err
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["create_pr"] and commit["repo"] == "someorg/tiny-model"
    assert commit["files"] == expected_files(audited, SLUG, prefix="rksp/")
    assert "README.md" not in commit["files"]  # the model's own card is untouched
    assert "pull request" in out
    assert_no_token(hub, audited, out, err)


def test_dry_run_uploads_nothing(capsys, audited, online):
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        online(hub)
        rc, out, err = run(capsys, "push", SLUG, "--repo-id", "alice/audits", "--dry-run",
                           "--out-dir", str(audited))
    assert rc == 0, err
    assert hub.requests == []
    for name in ("audit.json", "spectrum.png", "profile.png", "README.md"):
        assert name in out
    assert TOKEN not in out
    said = [ln for ln in out.splitlines() if ln.startswith("not checked")]
    assert said == [("not checked (it needs the network): that the Hub can be reached and that the token may "
                     "write to alice/audits; a token is set")]


def test_dry_run_without_a_token_says_the_push_would_stop_there(capsys, audited, online):
    """No token: the dry run still shows the plan (exit 0) and its one 'not checked' line says the real push
    would stop at the token; it sends nothing."""
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        online(hub, token=None)
        rc, out, err = run(capsys, "push", SLUG, "--repo-id", "alice/audits", "--dry-run", "--to-model",
                           "--out-dir", str(audited))
    assert rc == 0, err
    assert hub.requests == []
    said = [ln for ln in out.splitlines() if ln.startswith("not checked")]
    assert len(said) == 1 and "may write to alice/audits (open a pull request)" in said[0]
    assert said[0].endswith("no token is set (HF_TOKEN or `hf auth login`), so the real push would stop there")


def one_error(rc, err, *words):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-rksp: error:"), err
    for w in words:
        assert w in lines[0], lines[0]
    assert TOKEN not in err and "Traceback" not in err


def test_error_no_token(capsys, audited, online):
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        online(hub, token=None)
        rc, _, err = run(capsys, "push", SLUG, "--repo-id", "alice/audits", "--out-dir", str(audited))
    one_error(rc, err, "token")
    assert hub.commits == []


def test_error_repo_not_found(capsys, audited, online):
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        online(hub)
        rc, _, err = run(capsys, "push", SLUG, "--to-model", "--repo-id", "ghost/missing",
                         "--out-dir", str(audited))
    one_error(rc, err, "ghost/missing", "not found")
    assert hub.commits == []


def test_error_no_write_access(capsys, audited, online):
    with FakeHub(tokens={TOKEN: {"alice"}}, repos={"bob/audits"}) as hub:
        online(hub)
        rc, _, err = run(capsys, "push", SLUG, "--repo-id", "bob/audits", "--out-dir", str(audited))
    one_error(rc, err, "bob/audits", "write access")
    assert hub.commits == []


def test_error_rate_limited(capsys, audited, online):
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        hub.fail_status["commit"] = 429
        online(hub)
        rc, _, err = run(capsys, "push", SLUG, "--repo-id", "alice/audits", "--out-dir", str(audited))
    one_error(rc, err, "rate limit")
    assert hub.commits == []


def test_error_network_unreachable(capsys, audited, online):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    online(None, endpoint=f"http://127.0.0.1:{port}")
    rc, _, err = run(capsys, "push", SLUG, "--repo-id", "alice/audits", "--out-dir", str(audited))
    one_error(rc, err, "cannot reach the Hub")


def test_invalid_audit_is_not_pushed(capsys, audited, online, tmp_path):
    import shutil

    bad = tmp_path / "audits" / "broken"
    shutil.copytree(audited / "audits" / SLUG, bad)
    shutil.copytree(audited / "model_cards" / SLUG, tmp_path / "model_cards" / "broken")
    data = json.loads((bad / "audit.json").read_text())
    data["blocks"][0]["near_unit_mass"] = 1.5  # violates the schema
    (bad / "audit.json").write_text(json.dumps(data))
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        online(hub)
        rc, _, err = run(capsys, "push", "broken", "--repo-id", "alice/audits", "--out-dir", str(tmp_path))
    one_error(rc, err, "schema")
    assert hub.requests == []


SHAPED = "hf_" + "Q" * 34  # a token-shaped string that is not the active token


@pytest.mark.parametrize("where", ["card", "audit"])
def test_a_token_in_the_files_refuses_the_push_and_the_dry_run(capsys, audited, online, tmp_path, where):
    """The exact bytes to be sent are scanned: the active token or a token-shaped string in the card or the
    audit refuses the dry run and the push with one line naming the file, never the value; nothing is sent."""
    import shutil

    out = tmp_path / "o"
    shutil.copytree(audited, out)
    target = (out / "model_cards" / SLUG / "README.md" if where == "card"
              else out / "audits" / SLUG / "audit.json")
    if where == "card":
        target.write_text(target.read_text() + f"\nnotes: {TOKEN} {SHAPED}\n")
    else:
        data = json.loads(target.read_text())
        data["source"]["id"] = f"org/{SHAPED}"
        target.write_text(json.dumps(data, indent=2))
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        online(hub)
        for extra in (("--dry-run",), ()):
            rc, stdout, err = run(capsys, "push", SLUG, "--repo-id", "alice/audits", "--out-dir", str(out),
                                  *extra)
            one_error(rc, err, str(target), "holds a Hugging Face access token", "nothing was uploaded")
            assert SHAPED not in err and SHAPED not in stdout and TOKEN not in stdout
    assert hub.requests == []


def test_push_sends_the_bytes_it_scanned(capsys, audited, online, tmp_path):
    """A file changed between planning and pushing: the planned (scanned) bytes are what is sent, and a plan
    changed by hand to hold a token is scanned again and refused."""
    import dataclasses
    import shutil

    from hf_rksp.errors import SecretError
    from hf_rksp.publish import hub as hubmod

    out = tmp_path / "o"
    shutil.copytree(audited, out)
    plan = hubmod.plan_push(SLUG, "alice/audits", out_dir=out)
    want = expected_files(out, SLUG)
    card = out / "model_cards" / SLUG / "README.md"
    card.write_text(card.read_text() + f"\n{TOKEN}\n")  # after the scan
    with FakeHub(tokens={TOKEN: {"alice"}}) as hub:
        online(hub)
        hubmod.push(plan)
        assert hub.commits[0]["files"] == want
        bad = dataclasses.replace(plan, contents={**plan.contents, "README.md": card.read_bytes()})
        with pytest.raises(SecretError) as e:
            hubmod.push(bad)
    assert TOKEN not in str(e.value) and str(card) in str(e.value) and len(hub.commits) == 1
