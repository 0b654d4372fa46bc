"""A fake Hugging Face Hub on 127.0.0.1 for offline tests of the real `huggingface_hub` client.

Serves in-memory repos over the routes the 2.x client uses (shared/spec/hf-fake-hub.md §1), logs every request and
injects faults: cut transfers, corrupt bodies, gated repos, files that are listed but missing, transient 5xx.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

PIECE = 64 * 1024  # bodies are written in pieces so a cut lands mid-stream, as on a real network

API_RE = re.compile(r"^/api/models/([^/]+)/([^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
RESOLVE_RE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
CDN_RE = re.compile(r"^/cdn/([0-9a-f]{64})$")
RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub reports as `oid`/`blobId` and as ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeRepo:
    """One model repo at one commit. `lfs` files get LFS metadata; `lfs_mode` says how their bytes are served."""

    files: dict[str, bytes]
    lfs: frozenset[str] = frozenset()
    sha: str = ""  # 40 lowercase hex; derived from the contents when empty
    lfs_mode: str = "cdn"  # "cdn": 302 to another origin like the real Hub; "direct": 200 from /resolve

    def __post_init__(self) -> None:
        if not self.sha:
            h = hashlib.sha1()
            for path in sorted(self.files):
                h.update(path.encode() + b"\0" + self.files[path])
            self.sha = h.hexdigest()

    def pointer(self, path: str) -> bytes:
        data = self.files[path]
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n".encode()

    def tree_entry(self, path: str) -> dict:
        data = self.files[path]
        if path in self.lfs:
            ptr = self.pointer(path)
            lfs = {"oid": sha256(data), "size": len(data), "pointerSize": len(ptr)}
            return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(ptr), "lfs": lfs}
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}

    def sibling(self, path: str, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": path}
        entry = self.tree_entry(path)
        out = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if "lfs" in entry:
            lfs = entry["lfs"]
            out["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
        return out


@dataclass(frozen=True)
class Request:
    """One logged request. `file` is "<repo_id>/<path>" when it touched a repo file (HEAD/GET or CDN)."""

    method: str
    path: str
    query: str
    status: int
    range: str | None
    auth: str | None
    file: str | None


@dataclass
class _Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: str | None = None
    cut_after: int | None = None  # send the full Content-Length, write this many bytes, then drop the socket
    delay: float = 0.0  # seconds to sleep between body pieces (a slow transfer, to kill a client mid-way)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    # Track accepted sockets: shutdown() leaves keep-alive connections answering (spec P5).
    def process_request(self, request, client_address) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class FakeHub:
    """The server plus its repos, fault knobs and request log. Fault keys are "<repo_id>/<path>"."""

    def __init__(self, repos: dict[str, FakeRepo]) -> None:
        self.repos = repos
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        self._server = _Server(self)
        port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        # A different origin (host differs), so the client treats LFS redirects like the real CDN (spec P2).
        self.cdn_base = f"http://localhost:{port}/cdn"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        with self._server.sockets_lock:
            for sock in list(self._server.open_sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self._thread.join(timeout=5)

    # ---- fault knobs ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Clear the log and every fault."""
        with self._lock:
            self.log: list[Request] = []
            self._cut: dict[str, list[int]] = {}  # key -> [bytes to send, times left]
            self._corrupt: dict[str, int] = {}  # key -> times left to serve flipped bytes
            self._hidden: set[str] = set()  # listed in the tree, but /resolve answers 404 EntryNotFound
            self._gated: dict[str, str] = {}  # repo_id -> the token that grants access
            self._fail: list[list] = []  # [path substring, status, times left]
            self._slow: dict[str, float] = {}  # key -> seconds per body piece

    def cut(self, key: str, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self._cut[key] = [after_bytes, times]

    def slow(self, key: str, seconds_per_piece: float) -> None:
        """Serve the file's body slowly (every later GET), so a client can be killed mid-transfer."""
        with self._lock:
            self._slow[key] = seconds_per_piece

    def corrupt(self, key: str, times: int = 1) -> None:
        """Serve same-size wrong bytes for the file's next `times` GETs; metadata keeps the true hashes."""
        with self._lock:
            self._corrupt[key] = times

    def hide(self, key: str) -> None:
        with self._lock:
            self._hidden.add(key)

    def gate(self, repo_id: str, token: str) -> None:
        with self._lock:
            self._gated[repo_id] = token

    def fail(self, path_substring: str, status: int, times: int = 1) -> None:
        with self._lock:
            self._fail.append([path_substring, status, times])

    # ---- log queries ---------------------------------------------------------------------------------------
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self.log)

    def file_gets(self, key: str | None = None) -> list[Request]:
        """GETs that transfer file bytes (from /resolve or the CDN), optionally for one file."""
        return [r for r in self.requests() if r.method == "GET" and r.file and (key is None or r.file == key)]

    def touched_files(self) -> set[str]:
        """Files that got any HEAD or GET."""
        return {r.file for r in self.requests() if r.file}

    # ---- request handling (called from handler threads) ----------------------------------------------------
    def handle(self, method: str, raw_path: str, headers) -> _Reply:
        split = urlsplit(raw_path)
        path, query = split.path, split.query
        auth = headers.get("Authorization")
        reply = self._route(method, path, parse_qs(query), auth, headers.get("Range"))
        with self._lock:
            # Log before the response is written, or the client may return before the entry exists (spec P7).
            self.log.append(Request(method, unquote(path), query, reply.status, headers.get("Range"), auth, reply.file))
        return reply

    def _injected_failure(self, path: str) -> _Reply | None:
        with self._lock:
            for item in self._fail:
                if item[0] in unquote(path) and item[2] > 0:
                    item[2] -= 1
                    return _json(item[1], {"error": "injected failure"})
        return None

    def _route(self, method: str, path: str, query: dict, auth: str | None, range_: str | None) -> _Reply:
        if path == "/api/agent-harnesses":
            return _json(200, {"standardEnvVars": [], "harnesses": {}})
        injected = self._injected_failure(path)
        if injected is not None:
            return injected
        if m := API_RE.match(path):
            org, name, kind, rev, sub = (unquote(g) if g is not None else None for g in m.groups())
            return self._api(f"{org}/{name}", kind, rev, sub, query, auth)
        if m := RESOLVE_RE.match(path):
            org, name, rev, filename = (unquote(g) for g in m.groups())
            return self._resolve(method, f"{org}/{name}", rev, filename, auth, range_)
        if m := CDN_RE.match(path):
            return self._cdn(method, m.group(1), range_)
        return _json(404, {"error": "no such route"})

    def _api(self, repo_id: str, kind: str | None, rev: str | None, sub: str | None, query, auth) -> _Reply:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _repo_not_found(auth)
        if rev is not None and rev not in ("main", repo.sha):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if kind == "tree":
            return _json(200, _tree(repo, sub or "", query.get("recursive", ["false"])[0] == "true"))
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        body = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": False,
            "gated": "manual" if repo_id in self._gated else False,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "siblings": [repo.sibling(p, blobs) for p in sorted(repo.files)],
        }
        return _json(200, body)

    def _resolve(self, method: str, repo_id: str, rev: str, path: str, auth, range_) -> _Reply:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _repo_not_found(auth)
        if rev not in ("main", repo.sha):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        with self._lock:
            token = self._gated.get(repo_id)
            hidden = f"{repo_id}/{path}" in self._hidden
        if token is not None and auth != f"Bearer {token}":
            msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            return _error(401 if auth is None else 403, "GatedRepo", msg)
        key = f"{repo_id}/{path}"
        if path not in repo.files or hidden:
            reply = _error(404, "EntryNotFound", f"{path} does not exist on 'main'")
            reply.headers["X-Repo-Commit"] = repo.sha  # lets the client cache the non-existence
            reply.file = key
            return reply
        data = repo.files[path]
        commit = {"X-Repo-Commit": repo.sha}
        if path in repo.lfs and repo.lfs_mode == "cdn":
            headers = {
                **commit,
                "X-Linked-Etag": f'"{sha256(data)}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_sha1(repo.pointer(path))}"',
                "Location": f"{self.cdn_base}/{sha256(data)}",
                "Content-Length": "0",
            }
            return _Reply(302, headers, file=key)
        etag = sha256(data) if path in repo.lfs else git_blob_sha1(data)
        return self._bytes(method, key, data, range_, {**commit, "ETag": f'"{etag}"'})

    def _cdn(self, method: str, digest: str, range_) -> _Reply:
        for repo_id, repo in self.repos.items():
            for path in repo.lfs:
                if sha256(repo.files[path]) == digest:
                    return self._bytes(method, f"{repo_id}/{path}", repo.files[path], range_, {})
        return _json(404, {"error": "no such object"})

    def _bytes(self, method: str, key: str, data: bytes, range_: str | None, headers: dict) -> _Reply:
        """Serve a file body, honouring Range (206) and the cut/corrupt knobs (GET only)."""
        cut_after = None
        if method == "GET":
            with self._lock:
                if self._corrupt.get(key, 0) > 0:
                    self._corrupt[key] -= 1
                    data = bytes(b ^ 0xFF for b in data)
                if key in self._cut and self._cut[key][1] > 0:
                    self._cut[key][1] -= 1
                    cut_after = self._cut[key][0]
        total = len(data)
        headers = {**headers, "Accept-Ranges": "bytes"}
        status, start = 200, 0
        if range_ and (m := RANGE_RE.match(range_)):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else total - 1
            if start >= total:
                return _Reply(416, {"Content-Range": f"bytes */{total}", "Content-Length": "0"}, file=key)
            status, data = 206, data[start : min(end, total - 1) + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{total}"
        headers["Content-Length"] = str(len(data))  # the real size on HEAD too (spec P3)
        with self._lock:
            delay = self._slow.get(key, 0.0) if method == "GET" else 0.0
        return _Reply(status, headers, data, file=key, cut_after=cut_after, delay=delay)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # avoids 40 ms delayed-ACK stalls per request
    server: _Server

    def log_message(self, format, *args) -> None:
        pass  # no access log on stderr

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        reply = self.server.hub.handle(self.command, self.path, self.headers)
        self.send_response(reply.status)
        headers = {"Content-Length": str(len(reply.body)), **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        body = reply.body if reply.cut_after is None else reply.body[: reply.cut_after]
        for i in range(0, len(body), PIECE):
            self.wfile.write(body[i : i + PIECE])
            if reply.delay:
                self.wfile.flush()
                time.sleep(reply.delay)
        if reply.cut_after is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


def _json(status: int, payload) -> _Reply:
    return _Reply(status, {"Content-Type": "application/json"}, json.dumps(payload).encode())


def _error(status: int, code: str, message: str) -> _Reply:
    reply = _json(status, {"error": message})
    reply.headers.update({"X-Error-Code": code, "X-Error-Message": message})
    return reply


def _repo_not_found(auth: str | None) -> _Reply:
    # Like the real Hub: 401 for anonymous requests (the repo might be private), 404 with a token.
    return _error(401 if auth is None else 404, "RepoNotFound", "Repository not found")


def _tree(repo: FakeRepo, sub: str, recursive: bool) -> list[dict]:
    prefix = f"{sub.rstrip('/')}/" if sub else ""
    entries: dict[str, dict] = {}
    for path in sorted(repo.files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts)):  # folders on the way
            folder = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
        if recursive or len(parts) == 1:
            entries[path] = repo.tree_entry(path)
    return list(entries.values())
