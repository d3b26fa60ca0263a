"""A small HTTP server on 127.0.0.1 that speaks enough of the Hugging Face Hub API for the real
``huggingface_hub`` client and ``datasets`` to push a dataset, commit a card and load it back.

Implements, for dataset and model repos: repo creation, repo info, tree listing, paths-info, preupload (text files inline,
binary files through the basic LFS batch API; Xet must be disabled with HF_HUB_DISABLE_XET=1),
commits (ndjson), resolve (GET/HEAD),
validate-yaml and whoami. Tokens are checked (``Bearer <token>``). Faults can be injected: answer
the next matching requests with a status code, or drop the connection without an answer.

Used as a pytest fixture (``local_hub`` in test_publish.py); start it before ``huggingface_hub`` is
imported with ``HF_ENDPOINT`` pointing at it (the client reads the endpoint at import time).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _upload_mode(path: str) -> str:
    """Like the Hub: text files go inline in the commit, binary files through LFS."""
    return "regular" if path.endswith((".md", ".json", ".gitattributes", ".txt", ".yaml", ".csv")) else "lfs"


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    private: bool = False
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


@dataclass
class Fault:
    pattern: str  # regex on "METHOD /path"
    status: int | None  # None: drop the connection
    times: int = 1


class LocalHub:
    def __init__(self, token: str = "hf_local_test_token", user: str = "tester") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.faults: list[Fault] = []
        self.log: list[str] = []  # "METHOD path status"
        self.bodies: list[bytes] = []  # every request body received (to check no secret was sent)
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_POST(self):
                hub._handle(self, "POST")

            def do_PUT(self):
                hub._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, pattern: str, status: int | None, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``pattern`` with ``status`` (None: drop the connection)."""
        self.faults.append(Fault(pattern, status, times))

    # ------------------------------------------------------------------ plumbing
    def _reply(self, h, status: int, body=b"", headers: dict | None = None, method: str = "GET", error_code: str | None = None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        if error_code:
            h.send_header("X-Error-Code", error_code)
            h.send_header("X-Error-Message", error_code)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)

    def _handle(self, h, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(parsed.path)
        query = urllib.parse.parse_qs(parsed.query)
        with self.lock:
            self.bodies.append(body)
            for fault in self.faults:
                if fault.times > 0 and re.search(fault.pattern, f"{method} {path}"):
                    fault.times -= 1
                    self.log.append(f"{method} {path} fault:{fault.status}")
                    if fault.status is None:  # drop the connection without an answer
                        h.close_connection = True
                        h.connection.shutdown(2)
                        return
                    return self._reply(h, fault.status, {"error": f"injected {fault.status}"}, method=method,
                                       error_code="RepoNotFound" if fault.status == 404 else None)  # fmt: skip
        anonymous_ok = method in ("GET", "HEAD") or path.startswith("/lfs-upload/")  # upload hrefs are capabilities
        auth = h.headers.get("Authorization")
        if (auth is not None and auth != f"Bearer {self.token}") or (auth is None and not anonymous_ok):
            self.log.append(f"{method} {path} 401")
            return self._reply(h, 401, {"error": "Invalid credentials"}, method=method)
        status = self._route(h, method, path, query, body)
        self.log.append(f"{method} {path} {status}")

    @staticmethod
    def key(kind: str, repo_id: str) -> str:
        """Where a repo is kept in ``repos``: dataset repos by their id (as the tests name them), models as 'models/<id>'."""
        return repo_id if kind == "datasets" else f"models/{repo_id}"

    def _route(self, h, method, path, query, body) -> int:
        m = re.fullmatch(r"/api/(datasets|models)/([^/]+/[^/]+)(?:/(revision|tree|paths-info|preupload|commit)/([^/]+)(/.*)?)?", path)
        if path == "/api/whoami-v2":
            self._reply(h, 200, {"type": "user", "name": self.user, "orgs": [], "auth": {"type": "access_token",
                                 "accessToken": {"displayName": "test", "role": "write"}}})  # fmt: skip
            return 200
        if path == "/api/validate-yaml":
            self._reply(h, 200, {"errors": [], "warnings": []})
            return 200
        if path == "/api/repos/create" and method == "POST":
            req = json.loads(body or b"{}")
            repo_id = f"{req.get('organization') or self.user}/{req['name']}" if "/" not in req["name"] else req["name"]
            kind = "datasets" if req.get("type") == "dataset" else "models"
            url = f"{self.url}/datasets/{repo_id}" if kind == "datasets" else f"{self.url}/{repo_id}"
            if self.key(kind, repo_id) in self.repos:
                self._reply(h, 409, {"error": "You already created this repo", "url": url})
                return 409
            self.repos[self.key(kind, repo_id)] = Repo(private=bool(req.get("private")))
            self._reply(h, 200, {"url": url, "name": repo_id})
            return 200
        if m:
            repo_id, action, rest = m.group(2), m.group(3), (m.group(5) or "").lstrip("/")  # one branch: revisions ignored
            repo = self.repos.get(self.key(m.group(1), repo_id))
            if repo is None:
                self._reply(h, 404, {"error": "Repository not found"}, method=method, error_code="RepoNotFound")
                return 404
            if action in (None, "revision"):
                self._reply(h, 200, self._info(repo_id, repo), method=method)
                return 200
            if action == "tree":
                if rest and not any(p.startswith(rest.strip("/") + "/") for p in repo.files):
                    self._reply(h, 404, {"error": "Entry not found"}, method=method, error_code="EntryNotFound")
                    return 404
                self._reply(h, 200, self._tree(repo, rest, "recursive" in query and query["recursive"][0] in ("1", "true", "True")))
                return 200
            if action == "paths-info":
                form = urllib.parse.parse_qs(body.decode()) if body and not body.startswith(b"{") else {}
                paths = form.get("paths") or json.loads(body or b"{}").get("paths", [])
                self._reply(h, 200, [e for e in self._tree(repo, "", True) if e["path"] in paths])
                return 200
            if action == "preupload":
                files = json.loads(body)["files"]
                self._reply(h, 200, {"files": [{"path": f["path"], "uploadMode": _upload_mode(f["path"]), "shouldIgnore": False} for f in files],
                                     "commitOid": repo.sha})  # fmt: skip
                return 200
            if action == "commit":
                return self._commit(h, repo_id, repo, body)
        m = re.fullmatch(r"(?:/datasets)?/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            req = json.loads(body)
            objects = []
            for obj in req["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.blobs:
                    entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}", "header": {}}}
                objects.append(entry)
            self._reply(h, 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})
            return 200
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if m and method == "PUT":
            if hashlib.sha256(body).hexdigest() != m.group(1):
                self._reply(h, 400, {"error": "sha256 mismatch"})
                return 400
            self.blobs[m.group(1)] = body
            self._reply(h, 200, b"")
            return 200
        m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo = self.repos.get(self.key("datasets" if m.group(1) else "models", m.group(2)))
            if repo is None:
                self._reply(h, 404, b"", method=method, error_code="RepoNotFound")
                return 404
            data = repo.files.get(m.group(4))
            if data is None:
                self._reply(h, 404, b"", method=method, error_code="EntryNotFound")
                return 404
            etag = hashlib.sha1(data).hexdigest()
            self._reply(h, 200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha, "Content-Type": "application/octet-stream",
                                       "Accept-Ranges": "none"}, method=method)  # fmt: skip
            return 200
        self._reply(h, 404, {"error": f"not implemented: {method} {path}"}, method=method, error_code="EntryNotFound")
        return 404

    def _info(self, repo_id: str, repo: Repo) -> dict:
        return {"id": repo_id, "_id": repo_id, "sha": repo.sha, "private": repo.private, "disabled": False, "gated": False,
                "downloads": 0, "likes": 0, "tags": [], "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())]}  # fmt: skip

    def _tree(self, repo: Repo, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        out, dirs = [], set()
        for p, d in sorted(repo.files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rel = p[len(prefix) + 1 :] if prefix else p
            parts = rel.split("/")
            for i in range(1, len(parts)):
                sub = "/".join(([prefix] if prefix else []) + parts[:i])
                if (recursive or i == 1) and sub not in dirs:
                    dirs.add(sub)
                    out.append({"type": "directory", "path": sub, "oid": hashlib.sha1(sub.encode()).hexdigest(), "size": 0})
            if recursive or len(parts) == 1:
                out.append({"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()})
        return out

    def _commit(self, h, repo_id: str, repo: Repo, body: bytes) -> int:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        summary = ""
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                repo.files[value["path"]] = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
            elif key == "deletedFile":
                repo.files.pop(value["path"], None)
            elif key == "deletedFolder":
                for p in [p for p in repo.files if p.startswith(value["path"].rstrip("/") + "/")]:
                    del repo.files[p]
            elif key == "lfsFile":
                blob = self.blobs.get(value["oid"])
                if blob is None:
                    self._reply(h, 422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return 422
                repo.files[value["path"]] = blob
        oid = hashlib.sha1(f"{repo.sha}{summary}{time.time_ns()}".encode()).hexdigest()
        repo.commits.append(oid)
        self._reply(h, 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/datasets/{repo_id}/commit/{oid}",
                             "commitMessage": summary})  # fmt: skip
        return 200
