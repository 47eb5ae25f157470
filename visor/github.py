"""GitHub's REST v3 release API for one tag: find the release, download its assets with retries.

Owns talking HTTP to autoInstall.apiUrl (GitHub, a mirror or GitHub Enterprise): the release by tag or
through the paginated list, asset downloads with `Accept: application/octet-stream`, and fetch.progress
reports. requests and urllib3 do the HTTP work: urllib3's Retry (mounted through an HTTPAdapter) retries
connection failures, timeouts before a reply, 429 and 5xx with backoff and Retry-After; requests follows
redirects and drops the Authorization header when one leaves the host (or changes port or scheme).
What they cannot do is here: the token only ever starts out towards the API's own origin, a body cut
short or stalled is retried on the same policy, sizes are bounded, the body is hashed as it arrives.
Every call blocks, bounded by the timeouts in Source. The token (GITHUB_TOKEN) is never logged or put
in an error; neither is a URL's query (signed download URLs carry secrets).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (ConnectTimeoutError, MaxRetryError, NameResolutionError, NewConnectionError,
                                ProtocolError, ReadTimeoutError, SSLError)
from urllib3.util.retry import Retry

from visor import protocol
from visor.archive import MAX_TOTAL_BYTES
from visor.errors import FetchError

log = logging.getLogger(__name__)
logging.getLogger("urllib3").setLevel(logging.ERROR)   # its retry warnings show URLs whole; _Retry logs ours

Report = Callable[[object], None]          # receives protocol.Fetch* messages
JSON, BINARY = "application/vnd.github+json", "application/octet-stream"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_MAX_S = 30                     # a longer Retry-After is cut to this
BACKOFF_MAX_S = 15.0
MAX_REDIRECTS, MAX_PAGES = 5, 50
MAX_JSON_BYTES = 64 << 20
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
    # connect, and each read: a connection silent for 20 s is dead (a slow download is fine)
    timeout_s: tuple[float, float] = (10.0, 20.0)
    attempts: int = 4                      # per request: 5xx, 429, connection errors, timeouts, cut bodies
    backoff_s: float = 1.0                 # urllib3's backoff factor: 0, then 2, 4, 8 … s (at most 15)

    @classmethod
    def from_settings(cls, settings: dict, **tuning) -> Source:
        """From VisorConfig.fields() (what the broker sends in Prepare)."""
        return cls(settings["api_url"].rstrip("/"), settings["repository_owner"], settings["repository"],
                   settings["asset_name"], settings["asset_binary"], settings["checksums_name"], **tuning)

    @property
    def binary_name(self) -> str:
        return self.binary or self.asset


class _Retry(Retry):
    """urllib3's Retry, logging each retry in one line without the URL's query."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        new = super().increment(method, url, response, error, _pool, _stacktrace)   # MaxRetryError when used up
        why = f"HTTP {response.status}" if response is not None and error is None else describe(error)
        log.warning("%s: %s; retrying (%d attempts left)", _show(url or ""), why, new.total + 1)
        return new


class Client:
    """GitHub's REST v3 release API for one tag: find the release, download its assets."""

    def __init__(self, source: Source, tag: str, report: Report):
        self.source, self.tag, self.report = source, tag, report
        self.retry = _Retry(total=source.attempts - 1, allowed_methods={"GET"}, status_forcelist=RETRY_STATUSES,
                            backoff_factor=source.backoff_s, backoff_max=BACKOFF_MAX_S,
                            retry_after_max=RETRY_AFTER_MAX_S, raise_on_status=False)
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=self.retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.max_redirects = MAX_REDIRECTS
        # identity: Content-Length then counts the bytes we read and hash
        self.session.headers.update({"User-Agent": "visor (vega node supervisor)", "Accept-Encoding": "identity",
                                     "X-GitHub-Api-Version": "2022-11-28"})
        token = os.environ.get("GITHUB_TOKEN", "")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._api_origin = _origin(source.api_url)

    def find_release(self) -> dict:
        """By tag; else through the paginated list (drafts skipped), following its Link headers."""
        repo = f"{self.source.api_url}/repos/{quote(self.source.owner)}/{quote(self.source.repo)}"
        url = f"{repo}/releases/tags/{quote(self.tag, safe='')}"
        resp, body = self._get_json(url)
        if resp.status_code == 200:
            return _json(body, url, dict)
        if resp.status_code != 404:
            raise _http_error(url, resp, body)
        url, pages = f"{repo}/releases?per_page=100", 0
        while url and pages < MAX_PAGES:
            resp, body = self._get_json(url)
            if resp.status_code != 200:
                raise _http_error(url, resp, body)
            for release in _json(body, url, list):
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
        resp, sha256 = self._get(url, BINARY, out, tell, limit)
        if resp.status_code != 200:
            out.seek(0)
            raise _http_error(url, resp, out.read(64 * 1024))
        return sha256

    def _get_json(self, url: str) -> tuple[requests.Response, bytes]:
        body = io.BytesIO()
        resp, _sha256 = self._get(url, JSON, body, None, MAX_JSON_BYTES)
        return resp, body.getvalue()

    def _get(self, url: str, accept: str, out: BinaryIO, tell, limit: int) -> tuple[requests.Response, str]:
        """One GET, its body streamed into `out`. Returns the response (closed; any status but a retried one
        used up: the caller judges it) and the body's sha256. The adapter retries what fails before the
        body; this loop retries a body cut short or stalled, on the same policy."""
        retry = self.retry
        while True:
            resp = self._open(url, accept)
            if resp.status_code in RETRY_STATUSES:
                resp.close()
                raise FetchError(f"{_show(url)}: HTTP {resp.status_code} "
                                 f"(gave up after {self.source.attempts} attempts)")
            try:
                with resp:
                    return resp, _stream(resp, out, tell if resp.status_code == 200 else None, limit, url)
            except (ProtocolError, ReadTimeoutError) as err:
                try:
                    retry = retry.increment("GET", resp.url, error=err)
                except MaxRetryError:
                    raise FetchError(f"{_show(url)}: {describe(err, self.source)} "
                                     f"(gave up after {self.source.attempts} attempts)") from None
                retry.sleep()

    def _open(self, url: str, accept: str) -> requests.Response:
        """The reply's status and headers, redirects followed. The token starts out only towards the API's
        own origin; requests removes it on a redirect to any other host, port or scheme (object storage
        signs its own URLs and refuses a second credential)."""
        auth = self._auth if _origin(url) == self._api_origin else {}
        try:
            return self.session.get(url, headers={"Accept": accept, **auth}, timeout=self.source.timeout_s,
                                    stream=True)
        except requests.RequestException as err:
            raise FetchError(f"{_show(url)}: {describe(err, self.source)}") from None


def _stream(resp: requests.Response, out: BinaryIO, tell, limit: int, url: str) -> str:
    """Copies the body into `out` (rewound first); returns its sha256. urllib3 raises ProtocolError when
    the body ends short of its Content-Length, ReadTimeoutError when it stalls past the read timeout."""
    total = int(resp.headers.get("Content-Length") or 0)
    if total > limit:
        raise FetchError(f"{_show(url)}: {total} bytes is over the {limit}-byte limit")
    out.seek(0)
    out.truncate()
    sha, done, told_at = hashlib.sha256(), 0, -PROGRESS_EVERY_S
    # read1: whatever has arrived, so a slow download still reports progress; a full read would wait
    # for a whole chunk
    while chunk := resp.raw.read1(CHUNK):
        done += len(chunk)
        if done > limit:
            raise FetchError(f"{_show(url)}: more than the {limit}-byte limit")
        out.write(chunk)
        sha.update(chunk)
        if tell and time.monotonic() - told_at >= PROGRESS_EVERY_S:
            tell(done, total)
            told_at = time.monotonic()
    if tell:
        tell(done, total or done)
    return sha.hexdigest()


def describe(err: BaseException, source: Source | None = None) -> str:
    """What went wrong, in a few words, by exception type (requests wraps urllib3's, which wraps OSError).
    With `source`, timeouts say how long we waited and a used-up retry budget says so."""
    if isinstance(err, requests.TooManyRedirects):
        return f"more than {MAX_REDIRECTS} redirects"
    if isinstance(err, requests.RequestException) and err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    suffix = ""
    if isinstance(err, MaxRetryError) and err.reason is not None:
        err = err.reason
        suffix = f" (gave up after {source.attempts} attempts)" if source else ""
    connect_s, read_s = (f"within {t:g}s" for t in source.timeout_s) if source else ("in time", "in time")
    match err:
        case NameResolutionError():
            return "host not found" + suffix
        case NewConnectionError() if isinstance(err.__cause__, ConnectionRefusedError):
            return "connection refused" + suffix
        case NewConnectionError() if isinstance(err.__cause__, OSError):
            return f"cannot connect: {err.__cause__.strerror}{suffix}"
        case ConnectTimeoutError():
            return f"no connection {connect_s}{suffix}"
        case ReadTimeoutError():
            return f"no answer {read_s}{suffix}"
        case SSLError():
            return "TLS handshake failed" + suffix
        case ProtocolError():
            return "connection dropped mid-download" + suffix
    return type(err).__name__ + suffix


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _show(url: str) -> str:
    """A URL fit for a log line or an error: without its query (signed download URLs carry secrets)."""
    return urlsplit(url)._replace(query="", fragment="").geturl()


def _json(body: bytes, url: str, kind: type):
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, kind):
        raise FetchError(f"{_show(url)}: reply is not the JSON {kind.__name__} we expect")
    return data


def _http_error(url: str, resp: requests.Response, body: bytes) -> FetchError:
    try:
        message = str(json.loads(body).get("message", ""))[:160]
    except (ValueError, AttributeError):
        message = resp.reason or ""
    hint = " (a private repository needs GITHUB_TOKEN)" if resp.status_code == 404 and "/releases/" not in url \
        else ""
    return FetchError(f"{_show(url)}: HTTP {resp.status_code} {message}{hint}".rstrip())
