"""GitHub's REST v3 release API for one tag: find the release, download its assets with retries.

Owns talking HTTP to autoInstall.apiUrl (GitHub, a mirror or GitHub Enterprise): the release by tag or
through the paginated list, asset downloads with `Accept: application/octet-stream` following
redirects by hand, timeouts, bounded retries with backoff, and fetch.progress reports. The token
(GITHUB_TOKEN) goes to the API's own host only and is never logged or put in an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable
from urllib.parse import quote, urljoin, urlsplit

import requests
import urllib3

from visor import protocol
from visor.archive import MAX_TOTAL_BYTES
from visor.errors import FetchError

log = logging.getLogger(__name__)

Report = Callable[[object], None]          # receives protocol.Fetch* and protocol.Heartbeat messages
JSON, BINARY = "application/vnd.github+json", "application/octet-stream"
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS, MAX_PAGES = 5, 50
PROGRESS_EVERY_S = 0.25                    # fetch.progress at most ~4 per second
CHUNK = 256 * 1024


@dataclass(frozen=True)
class Source:
    """Where a release comes from (the autoInstall settings) and how patient we are with it."""
    api_url: str
    owner: str
    repo: str
    asset: str
    binary: str                            # the binary inside the asset; empty: the asset itself
    checksums: str = ""
    timeout_s: tuple[float, float] = (10.0, 30.0)    # connect, and each read (a slow download is fine)
    attempts: int = 4                      # per request: 5xx, 429, connection errors, timeouts
    backoff_s: float = 1.0                 # doubled after each failed attempt

    @classmethod
    def from_settings(cls, settings: dict, **tuning) -> Source:
        """From VisorConfig.fields() (what the broker sends in Prepare)."""
        return cls(settings["api_url"].rstrip("/"), settings["repository_owner"], settings["repository"],
                   settings["asset_name"], settings["asset_binary"], settings["checksums_name"], **tuning)

    @property
    def binary_name(self) -> str:
        return self.binary or self.asset


class Client:
    """GitHub's REST v3 release API for one tag: find the release, download its assets."""

    def __init__(self, source: Source, tag: str, report: Report):
        self.source, self.tag, self.report = source, tag, report
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "visor (vega node supervisor)"
        token = os.environ.get("GITHUB_TOKEN", "")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._api_origin = _origin(source.api_url)

    def find_release(self) -> dict:
        """By tag; else through the paginated list (drafts skipped), following its Link headers."""
        repo = f"{self.source.api_url}/repos/{quote(self.source.owner)}/{quote(self.source.repo)}"
        url = f"{repo}/releases/tags/{quote(self.tag, safe='')}"
        resp = self._get(url, JSON)
        if resp.status_code == 200:
            return _json(resp, url, dict)
        if resp.status_code != 404:
            raise _http_error(url, resp)
        url, pages = f"{repo}/releases?per_page=100", 0
        while url and pages < MAX_PAGES:
            resp = self._get(url, JSON)
            if resp.status_code != 200:
                raise _http_error(url, resp)
            for release in _json(resp, url, list):
                if isinstance(release, dict) and release.get("tag_name") == self.tag and not release.get("draft"):
                    return release
            url, pages = resp.links.get("next", {}).get("url"), pages + 1
        raise FetchError(f"{_show(repo)}: no release tagged {self.tag}")

    def download(self, asset: dict, out: BinaryIO, *, progress: bool = False, limit: int = MAX_TOTAL_BYTES) -> str:
        """Downloads an asset into `out` (rewound on each attempt). Returns its sha256."""
        url = asset.get("url") or f"{self.source.api_url}/repos/{self.source.owner}/{self.source.repo}" \
                                  f"/releases/assets/{asset.get('id')}"
        name, size = str(asset.get("name")), int(asset.get("size") or 0)
        tell = (lambda done, total: self.report(protocol.FetchProgress(
            tag=self.tag, asset=name, bytes=done, total=total or size))) if progress else None
        return self._get(url, BINARY, out=out, tell=tell, limit=limit)

    def _get(self, url: str, accept: str, *, out: BinaryIO | None = None, tell=None,
             limit: int = MAX_TOTAL_BYTES) -> requests.Response | str:
        """One GET with bounded retries. Without `out`: the response (status < 500; the caller judges
        it). With `out`: the body is streamed there and its sha256 returned; any status but 200 fails."""
        problem = ""
        for attempt in range(1, self.source.attempts + 1):
            if attempt > 1:
                delay_s = self.source.backoff_s * 2 ** (attempt - 2)
                log.warning("%s: %s; retrying in %.1fs (attempt %d of %d)",
                            _show(url), problem, delay_s, attempt, self.source.attempts)
                time.sleep(delay_s)
            self.report(protocol.Heartbeat())       # the broker kills a worker silent for too long
            try:
                resp = self._open(url, accept)
                if resp.status_code >= 500 or resp.status_code == 429:
                    problem = f"HTTP {resp.status_code}"
                    resp.close()
                    continue
                if out is None:
                    resp.content                   # read here, where a cut-off body is retried
                    return resp
                if resp.status_code != 200:
                    raise _http_error(url, resp)
                with resp:
                    digest, problem = _stream(resp, out, tell, limit, url)
                if not problem:
                    return digest
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError, urllib3.exceptions.HTTPError) as err:
                problem = self._describe(err)
        raise FetchError(f"{_show(url)}: {problem} (gave up after {self.source.attempts} attempts)")

    def _open(self, url: str, accept: str) -> requests.Response:
        """Follows redirects itself: the token goes to the API's host only, never to where a download
        is redirected (object storage signs its own URLs and refuses a second credential)."""
        headers = {"Accept": accept, "X-GitHub-Api-Version": "2022-11-28"}
        if accept == BINARY:
            headers["Accept-Encoding"] = "identity"    # so Content-Length counts the bytes we hash
        for hop in range(MAX_REDIRECTS + 1):
            auth = self._auth if hop == 0 and _origin(url) == self._api_origin else {}
            resp = self.session.get(url, headers={**headers, **auth}, timeout=self.source.timeout_s,
                                    stream=True, allow_redirects=False)
            if resp.status_code not in REDIRECTS or "Location" not in resp.headers:
                return resp
            url = urljoin(url, resp.headers["Location"])
            resp.close()
        raise FetchError(f"{_show(url)}: more than {MAX_REDIRECTS} redirects")

    def _describe(self, err: Exception) -> str:
        text = str(err)
        if isinstance(err, requests.ConnectTimeout):
            return f"no connection within {self.source.timeout_s[0]:g}s"
        if isinstance(err, (requests.Timeout, urllib3.exceptions.TimeoutError)) or "timed out" in text:
            return f"no answer within {self.source.timeout_s[1]:g}s"
        if isinstance(err, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
            return "connection dropped mid-download"
        for words, short in (("Connection refused", "connection refused"), ("NameResolution", "host not found"),
                             ("Name or service not known", "host not found"), ("SSL", "TLS handshake failed")):
            if words in text:
                return short
        return f"{type(err).__name__}: {text[:160]}"


def _stream(resp: requests.Response, out: BinaryIO, tell, limit: int, url: str) -> tuple[str, str]:
    """(sha256, "") once the whole body is in `out`; ("", problem) when it was cut short."""
    total = int(resp.headers.get("Content-Length") or 0)
    if total > limit:
        raise FetchError(f"{_show(url)}: {total} bytes is over the {limit}-byte limit")
    out.seek(0)
    out.truncate()
    sha, done, told_at = hashlib.sha256(), 0, -PROGRESS_EVERY_S
    # read1: whatever has arrived, so a slow download still reports progress (and keeps the worker
    # heard from); iter_content would wait for a whole chunk. urllib3 < 2 has no read1.
    read = getattr(resp.raw, "read1", None) or (lambda n: resp.raw.read(min(n, 16 * 1024)))
    while chunk := read(CHUNK):
        done += len(chunk)
        if done > limit:
            raise FetchError(f"{_show(url)}: more than the {limit}-byte limit")
        out.write(chunk)
        sha.update(chunk)
        if tell and time.monotonic() - told_at >= PROGRESS_EVERY_S:
            tell(done, total)
            told_at = time.monotonic()
    if total and done != total:
        return "", f"connection dropped after {done} of {total} bytes"
    if tell:
        tell(done, total or done)
    return sha.hexdigest(), ""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _show(url: str) -> str:
    """A URL fit for a log line or an error: without its query (signed download URLs carry secrets)."""
    return urlsplit(url)._replace(query="", fragment="").geturl()


def _json(resp: requests.Response, url: str, kind: type):
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, kind):
        raise FetchError(f"{_show(url)}: reply is not the JSON {kind.__name__} we expect")
    return body


def _http_error(url: str, resp: requests.Response) -> FetchError:
    try:
        message = str(resp.json().get("message", ""))[:160]
    except (ValueError, AttributeError):
        message = resp.reason or ""
    hint = " (a private repository needs GITHUB_TOKEN)" if resp.status_code == 404 and "/releases/" not in url \
        else ""
    return FetchError(f"{_show(url)}: HTTP {resp.status_code} {message}{hint}".rstrip())
