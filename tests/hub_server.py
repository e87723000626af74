"""A local stand-in for the Hugging Face Hub's file endpoint, so Hub loading is tested through the real
huggingface_hub client (HF_ENDPOINT points here) without a network.

It answers `HEAD|GET /<owner>/<name>/resolve/<revision>/<path>` as the Hub does: the X-Repo-Commit and ETag
headers on success, and the Hub's X-Error-Code values (RepoNotFound, GatedRepo, RevisionNotFound,
EntryNotFound) with its status codes on failure. Every served path is logged, to check what was fetched.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

TOKEN = "hf_test_token"


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False  # needs TOKEN
    private: bool = False  # needs TOKEN; without it the Hub answers 401 RepoNotFound
    revisions: tuple[str, ...] = ("main",)


@dataclass
class Hub:
    repos: dict[str, Repo]
    served: list[str] = field(default_factory=list)  # "repo/path" of every file body sent (GET)

    def start(self) -> tuple[str, ThreadingHTTPServer]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _answer(self, body: bool) -> None:
                parts = unquote(self.path.split("?")[0]).lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
                if repo is None or (repo.private and not authorized):
                    return self._error(401, "RepoNotFound")
                if repo.gated and not authorized:
                    return self._error(403, "GatedRepo")
                if revision not in repo.revisions:
                    return self._error(404, "RevisionNotFound")
                if path not in repo.files:
                    return self._error(404, "EntryNotFound")
                data = repo.files[path]
                self.send_response(200)
                self.send_header("X-Repo-Commit", hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest())
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    hub.served.append(f"{repo_id}/{path}")
                    self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}", server
