"""A local stand-in for the Hub endpoints huggingface_hub calls to create a repo, commit and download.

It speaks the real wire format (repos/create, validate-yaml, preupload, NDJSON
commit, create_pr; HEAD/GET of /{repo}/resolve/{revision}/{file} with the
X-Repo-Commit / ETag headers hf_hub_download reads, and byte ranges) so the
real client runs unmodified against it, on 127.0.0.1 only, and records every
request and commit for the tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO_URL = re.compile(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/([^?]+)")
RESOLVE_URL = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
COMMIT = "c0ffee" + "0" * 34


class FakeHub:
    def __init__(self, tokens: dict[str, set[str]] | None = None, repos: set[str] | None = None,
                 files: dict[str, dict[str, bytes]] | None = None):
        self.tokens = tokens or {}  # token -> namespaces it may write to
        self.files = files or {}  # repo -> {path: content}, served by /resolve/
        self.repos = set(repos or ())
        self.commits: list[dict] = []
        self.requests: list[dict] = []  # method, path, headers, body (raw)
        self.fail_status: dict[str, int] = {}  # endpoint kind ("commit", "preupload", "create") -> status
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict | None = None, headers: dict | None = None):
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_HEAD(self):  # noqa: N802 (http.server API)
                self._resolve(body=False)

            def do_GET(self):  # noqa: N802
                self._resolve(body=True)

            def _resolve(self, body: bool):
                """A file of a repo, whole or a byte range, with the headers hf_hub_download reads."""
                with hub.lock:
                    hub.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                         "body": b""})
                from urllib.parse import unquote

                m = RESOLVE_URL.match(unquote(self.path.split("?")[0]))
                if not m or m.group(1) not in hub.files:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                repo, _rev, path = m.groups()
                data = hub.files[repo].get(path)
                if data is None:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                          "X-Repo-Commit": COMMIT})
                status, start, end = 200, 0, len(data)
                rng = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if rng:
                    status, start = 206, int(rng.group(1))
                    end = min(int(rng.group(2)) + 1, len(data)) if rng.group(2) else len(data)
                self.send_response(status)
                self.send_header("Content-Length", str(end - start))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[start:end])

            def do_POST(self):  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with hub.lock:
                    hub.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                         "body": body})
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                path = self.path.split("?")[0]
                query = self.path.split("?")[1] if "?" in self.path else ""
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    if "create" in hub.fail_status:
                        return self._send(hub.fail_status["create"], {"error": "injected"})
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo.split("/")[0] not in hub.tokens.get(token, set()):
                        return self._send(403, {"error": "You don't have the rights to create this repo"})
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": repo})
                    hub.repos.add(repo)
                    return self._send(200, {"url": f"{hub.endpoint}/{repo}"})
                m = REPO_URL.match(path)
                if not m:
                    return self._send(404, {"error": "unknown endpoint"})
                repo, kind, revision = m.groups()
                if kind in hub.fail_status:
                    return self._send(hub.fail_status[kind], {"error": "injected"})
                if token not in hub.tokens:
                    return self._send(401, {"error": "Invalid credentials"},
                                      {"X-Error-Message": "Invalid credentials in Authorization header"})
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if repo.split("/")[0] not in hub.tokens[token] and "create_pr=1" not in query:
                    return self._send(403, {"error": "You don't have write access"})
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in files
                    ]})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {}
                for item in lines:
                    if item["key"] == "file":
                        v = item["value"]
                        files[v["path"]] = base64.b64decode(v["content"])
                header = next(i["value"] for i in lines if i["key"] == "header")
                create_pr = "create_pr=1" in query
                with hub.lock:
                    hub.commits.append({"repo": repo, "revision": revision, "create_pr": create_pr,
                                        "summary": header.get("summary"), "files": files})
                    n = len(hub.commits)
                return self._send(200, {
                    "commitUrl": f"{hub.endpoint}/{repo}/commit/{n:040d}",
                    "commitOid": f"{n:040d}",
                    "pullRequestUrl": f"{hub.endpoint}/{repo}/discussions/{n}" if create_pr else None,
                })

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
