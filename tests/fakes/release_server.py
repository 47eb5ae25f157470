"""A fake GitHub REST v3 release API on 127.0.0.1, with GitHub's JSON shapes and Link pagination.

Owns the fake releases and their asset bytes. Serves, for `owner/repo` only (names compare without
case, as on GitHub; anything else is a GitHub-shaped 404):
  GET /repos/{o}/{r}/releases?per_page=&page=      newest first; Link header as GitHub writes it,
      (and /repositories/{repo_id}/releases)       with URLs by repository id, as GitHub's are
  GET /repos/{o}/{r}/releases/tags/{tag}           unless by_tag_enabled is False
  GET /repos/{o}/{r}/releases/latest | /{id}
  GET /repos/{o}/{r}/releases/assets/{id}          JSON; with Accept: application/octet-stream a 302
  GET /{o}/{r}/releases/download/{tag}/{name}      browser_download_url: a 302 as well
  GET /download/{id}/{name}                        the bytes (stands in for GitHub's object storage)
Faults are plain attributes, read on each request; every request lands in `.requests`.
"""
from __future__ import annotations

import json
import math
import mimetypes
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

_DOCS = "https://docs.github.com/rest/releases/releases"
_USER = {"login": "fake-releaser", "id": 1, "type": "User", "site_admin": False}


class Headers(dict):
    """Request headers, keys compared without case as HTTP does (stored lower-case)."""

    def __init__(self, items=()):
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)


class ReleaseServer:
    def __init__(self, owner: str = "vegaprotocol", repo: str = "vega"):
        self.owner, self.repo, self.repo_id = owner, repo, 4242
        self.by_tag_enabled = True                   # False: the by-tag endpoint 404s (list fallback)
        self.per_page_default = 30
        self.fail_next: list[int] = []               # statuses for the next requests, one each
        self.retry_after: str | None = None          # a Retry-After header on those failures
        self.delay_s = 0.0                           # before answering any request
        self.drop_download_after: int | None = None  # full Content-Length, then close after N bytes
        self.throttle_bytes_per_s: int | None = None
        self.stall_after: int | None = None          # a download pauses after this many bytes ...
        self.stall_s = 0.0                           # ... for this long, then goes on
        self.download_host = "127.0.0.1"             # "localhost": the 302 leaves the API's host
        self.reject_auth_on_download = False         # object storage refuses a forwarded token
        self.requests: list[tuple[str, str, Headers]] = []
        self._releases: list[dict] = []              # newest first, as GitHub lists them
        self._assets: dict[int, tuple[dict, dict, bytes]] = {}  # id -> (release, asset, bytes)
        self._next_id = 1000
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> ReleaseServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-github", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> ReleaseServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- content ------------------------------------------------------------------------------
    def add_release(self, tag: str, assets: dict[str, bytes], *, name: str | None = None,
                    draft: bool = False, prerelease: bool = False) -> int:
        """Adds a release, newer than all before it. Returns its id."""
        with self._lock:
            release = {"id": self._take_id(), "tag": tag, "name": name if name is not None else tag,
                       "draft": draft, "prerelease": prerelease, "n": len(self._releases), "assets": []}
            for asset_name, data in assets.items():
                asset = {"id": self._take_id(), "name": asset_name}
                release["assets"].append(asset)
                self._assets[asset["id"]] = (release, asset, data)
            self._releases.insert(0, release)
            return release["id"]

    def asset_id(self, tag: str, name: str) -> int:
        return next(i for i, (r, a, _) in self._assets.items() if (r["tag"], a["name"]) == (tag, name))

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _stamp(self, release: dict) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1704067200 + 86400 * release["n"]))

    def release_json(self, release: dict) -> dict:
        api, repo_path = f"{self.url}/repos/{self.owner}/{self.repo}", f"{self.owner}/{self.repo}"
        rid, tag = release["id"], release["tag"]
        return {
            "url": f"{api}/releases/{rid}", "assets_url": f"{api}/releases/{rid}/assets",
            "upload_url": f"{self.url}/uploads/repos/{repo_path}/releases/{rid}/assets{{?name,label}}",
            "html_url": f"{self.url}/{repo_path}/releases/tag/{quote(tag)}",
            "id": rid, "author": _USER, "node_id": f"RE_fake{rid}", "tag_name": tag,
            "target_commitish": "main", "name": release["name"], "draft": release["draft"],
            "prerelease": release["prerelease"], "created_at": self._stamp(release),
            "published_at": self._stamp(release),
            "assets": [self.asset_json(release, a) for a in release["assets"]],
            "tarball_url": f"{api}/tarball/{quote(tag)}", "zipball_url": f"{api}/zipball/{quote(tag)}",
            "body": f"Release {tag} (fake)"}

    def asset_json(self, release: dict, asset: dict) -> dict:
        data = self._assets[asset["id"]][2]
        tag, name = quote(release["tag"]), quote(asset["name"])
        download = f"{self.owner}/{self.repo}/releases/download/{tag}/{name}"
        return {
            "url": f"{self.url}/repos/{self.owner}/{self.repo}/releases/assets/{asset['id']}",
            "id": asset["id"], "node_id": f"RA_fake{asset['id']}", "name": asset["name"], "label": "",
            "uploader": _USER, "state": "uploaded", "size": len(data), "download_count": 0,
            "content_type": mimetypes.guess_type(asset["name"])[0] or "application/octet-stream",
            "created_at": self._stamp(release), "updated_at": self._stamp(release),
            "browser_download_url": f"{self.url}/{download}"}

    def download_url(self, asset_id: int) -> str:
        port, name = self._httpd.server_address[1], self._assets[asset_id][1]["name"]
        return f"http://{self.download_host}:{port}/download/{asset_id}/{quote(name)}"

    def is_repo(self, owner: str, repo: str) -> bool:
        return (owner.lower(), repo.lower()) == (self.owner.lower(), self.repo.lower())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args):
        pass

    def do_GET(self):
        fake: ReleaseServer = self.server.fake
        with fake._lock:
            fake.requests.append(("GET", self.path, Headers(self.headers.items())))
            status = fake.fail_next.pop(0) if fake.fail_next else None
        if fake.delay_s:
            time.sleep(fake.delay_s)
        if status:
            return self.send_json(status, {"message": HTTPStatus(status).phrase, "documentation_url": _DOCS},
                                  {"Retry-After": fake.retry_after} if fake.retry_after else {})
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        try:
            self.route(fake, parts, parse_qs(url.query))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left mid-answer; nothing more to do

    def route(self, fake: ReleaseServer, parts: list[str], query: dict) -> None:
        if parts[:1] == ["repos"] and parts[3:4] == ["releases"] and fake.is_repo(*parts[1:3]):
            rest = parts[4:]
        elif parts[:3] == ["repositories", str(fake.repo_id), "releases"]:
            rest = parts[3:]
        elif parts[:1] == ["download"] and len(parts) == 3 and parts[1].isdigit():
            return self.send_bytes(fake, int(parts[1])) if int(parts[1]) in fake._assets else self.not_found()
        elif len(parts) == 6 and parts[2:4] == ["releases", "download"] and fake.is_repo(*parts[:2]):
            found = [i for i, (r, a, _) in fake._assets.items() if (r["tag"], a["name"]) == tuple(parts[4:])]
            return self.redirect(fake.download_url(found[0])) if found else self.not_found()
        else:
            return self.not_found()
        releases = fake._releases
        match rest:
            case []:
                return self.send_list(fake, query)
            case ["tags", tag] if fake.by_tag_enabled:
                found = [r for r in releases if r["tag"] == tag and not r["draft"]]
            case ["latest"]:
                found = [r for r in releases if not r["draft"] and not r["prerelease"]][:1]
            case [rid] if rid.isdigit():
                found = [r for r in releases if r["id"] == int(rid)]
            case ["assets", aid] if aid.isdigit() and int(aid) in fake._assets:
                release, asset, _ = fake._assets[int(aid)]
                if "application/octet-stream" in self.headers.get("Accept", ""):
                    return self.redirect(fake.download_url(asset["id"]))
                return self.send_json(200, fake.asset_json(release, asset))
            case _:
                found = []
        return self.send_json(200, fake.release_json(found[0])) if found else self.not_found()

    def send_list(self, fake: ReleaseServer, query: dict) -> None:
        try:
            per_page = min(100, max(1, int(query.get("per_page", [fake.per_page_default])[0])))
            page = max(1, int(query.get("page", ["1"])[0]))
        except ValueError:
            per_page, page = fake.per_page_default, 1
        releases = fake._releases
        last = max(1, math.ceil(len(releases) / per_page))
        chunk = releases[(page - 1) * per_page: page * per_page]
        # GitHub's order: prev, next, last, first; each only when it makes sense; no header at all
        # when everything fits on one page. per_page is kept in the links only when it was asked for.
        keep = f"per_page={query['per_page'][0]}&" if "per_page" in query else ""
        rels = [("prev", page - 1, page > 1), ("next", page + 1, page < last),
                ("last", last, page < last), ("first", 1, page > 1)]
        link = ", ".join(f'<{fake.url}/repositories/{fake.repo_id}/releases?{keep}page={p}>; rel="{rel}"'
                         for rel, p, wanted in rels if wanted)
        self.send_json(200, [fake.release_json(r) for r in chunk], {"Link": link} if link else {})

    def not_found(self) -> None:
        self.send_json(404, {"message": "Not Found", "documentation_url": _DOCS, "status": "404"})

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_json(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_bytes(self, fake: ReleaseServer, asset_id: int) -> None:
        _release, asset, data = fake._assets[asset_id]
        if fake.reject_auth_on_download and "Authorization" in self.headers:
            msg = b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed" \
                  b"</Message></Error>"
            self.send_response(400)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            return self.wfile.write(msg)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))  # always the full size, even when dropping
        self.send_header("Content-Disposition", f"attachment; filename={asset['name']}")
        self.end_headers()
        limit = len(data) if fake.drop_download_after is None else min(len(data), fake.drop_download_after)
        rate = fake.throttle_bytes_per_s
        step = max(1, rate // 20) if rate else 64 * 1024
        for start in range(0, limit, step):
            end = min(start + step, limit)
            if fake.stall_after is not None and start <= fake.stall_after < end:
                self.wfile.write(data[start:fake.stall_after])
                self.wfile.flush()
                time.sleep(fake.stall_s)
                start = fake.stall_after
            self.wfile.write(data[start:end])
            if rate:
                self.wfile.flush()
                time.sleep(step / rate)
        if limit < len(data):
            self.wfile.flush()
            self.close_connection = True  # the client is left short of Content-Length
