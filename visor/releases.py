"""From a release tag to a verified release folder: release API, download, checksum, safe unzip, rename.

Owns auto-install: finding the release at autoInstall.apiUrl, downloading its asset (and checksums),
extracting it safely, deriving the folder's run-config from the current one, verifying the result
and renaming it into place; also the verification of a folder that already exists. All of it
blocks, so only the fetcher worker and `visor fetch` call it, never the broker. All work happens in
HOME/.TAG.partial-XXXX beside the target: a crash or failure never leaves a folder that looks ready.
Reports (Fetch*, Heartbeat) go to a callback as protocol messages. The GitHub token is sent to the
API's own host only; it is never logged and never part of an error.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import io
import logging
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable
from urllib.parse import quote, urljoin, urlsplit

import requests
import tomli_w
import urllib3

from visor import protocol
from visor.config import load_run_config, load_visor_config, read_toml
from visor.errors import ConfigError, FetchError, NodeError, VisorError
from visor.nodeapi import binary_version

log = logging.getLogger(__name__)

Report = Callable[[object], None]          # receives protocol.Fetch* and protocol.Heartbeat messages
JSON, BINARY = "application/vnd.github+json", "application/octet-stream"
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS, MAX_PAGES = 5, 50
MAX_ENTRY_BYTES, MAX_TOTAL_BYTES, MAX_ENTRIES = 2 << 30, 4 << 30, 10_000
MAX_CHECKSUMS_BYTES = 1 << 20
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


# --- verify and install -------------------------------------------------------------------------

def check_folder(folder: Path, tag: str) -> str:
    """The reason `folder` cannot be upgraded to, or "": run-config, binaries, `version` == tag."""
    if not folder.is_dir():
        return f"{folder}: not a folder"
    try:
        rc, _warnings = load_run_config(folder / "run-config.toml")
        for binary in rc.binaries().values():
            if not binary.path.is_file():
                return f"{binary.path}: binary not found"
            if not os.access(binary.path, os.X_OK):
                return f"{binary.path}: not executable"
        version = binary_version(str(rc.vega.path))
    except (ConfigError, NodeError) as err:
        return str(err)
    return "" if version == tag else f"version mismatch: {rc.vega.path} reports {version}, want {tag}"


def ensure_folder(folder: Path, tag: str, current_run_config: Path, source: Source | None,
                  report: Report) -> None:
    """Makes `folder` ready for `tag`: verifies it when it exists, else fetches it (source None: may not)."""
    if not tag or "/" in tag or tag.startswith("."):   # it names a folder in the home; it comes from the chain
        raise FetchError(f"release tag {tag!r} cannot name a folder; refusing it")
    if os.path.lexists(folder):
        if problem := check_folder(folder, tag):
            raise FetchError(problem)
        return
    if source is None:
        raise FetchError(f"folder {folder} is missing and auto-install is off")
    report(protocol.FetchStarted(tag=tag, asset=source.asset))
    try:
        sha256 = _install(folder, tag, current_run_config, source, report)
    except (VisorError, OSError) as err:
        error = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else str(err)
        report(protocol.FetchFailed(tag=tag, asset=source.asset, error=error))
        raise FetchError(f"fetch of {tag} failed: {error}") from None
    report(protocol.FetchCompleted(tag=tag, asset=source.asset, sha256=sha256))


def _install(folder: Path, tag: str, current_run_config: Path, source: Source, report: Report) -> str:
    run_config = derive_run_config(current_run_config, tag, source.binary_name)   # fail early on a bad one
    _remove_stale_partials(folder)
    with _Partial(folder) as work:
        client = Client(source, tag, report)
        release = client.find_release()
        archive = work.root / "download"
        with open(archive, "w+b") as out:
            sha256 = client.download(_asset(release, source.asset, tag), out, progress=True)
        if source.checksums:
            listing = io.BytesIO()
            client.download(_asset(release, source.checksums, tag), listing, limit=MAX_CHECKSUMS_BYTES)
            _check_sha256(listing.getvalue(), source.checksums, source.asset, sha256)
        binary = _target(work.folder, source.binary_name, "autoInstall.asset.binaryName")
        extract(archive, source.asset, work.folder, binary)
        if not binary.is_file() or binary.is_symlink():
            raise FetchError(f"{source.asset}: holds no file named {source.binary_name}")
        binary.chmod(binary.stat().st_mode | 0o111)            # a+x, as the Go visor does
        _write_synced(work.folder / "run-config.toml", run_config)
        if problem := check_folder(work.folder, tag):
            raise FetchError(problem.replace(str(work.folder), source.asset))
        work.commit(tag)
    return sha256


def derive_run_config(current: Path, tag: str, binary: str) -> bytes:
    """The current run-config with name = tag, binary paths = the fetched binary, and data-node args
    starting `datanode start`, as the Go visor writes it. Everything else is copied unchanged."""
    load_run_config(current)                 # the checks `visor run` makes, so a broken template is named
    raw = read_toml(current)
    raw["name"] = tag
    raw["vega"]["binary"]["path"] = binary
    if (data_node := raw.get("data_node")) is not None:
        data_node["binary"]["path"] = binary
        args = data_node["binary"].get("args", [])
        if args and args[0] != "datanode":
            data_node["binary"]["args"] = ["datanode", "start", *args[1:]]
    return tomli_w.dumps(raw).encode()


class _Partial:
    """HOME/.TAG.partial-XXXX, holding the download and folder/; flock'ed while in use, removed on exit
    unless folder/ was renamed into place. A crashed fetch's lock dies with it: it is then stale."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> _Partial:
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.folder = self.root / "folder"
        self.folder.mkdir()
        return self

    def commit(self, tag: str) -> None:
        if os.path.lexists(self.target):     # someone else (an operator, another fetch) got there first
            if problem := check_folder(self.target, tag):
                raise FetchError(f"{self.target} appeared meanwhile: {problem}")
            return
        os.rename(self.folder, self.target)  # one step: before it no folder, after it a verified one
        _fsync_dir(self.target.parent)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        os.close(self._fd)


def _remove_stale_partials(target: Path) -> None:
    for stale in glob.glob(f".{glob.escape(target.name)}.partial-*", root_dir=target.parent):
        try:
            fd = os.open(target.parent / stale, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            log.info("removing %s, left by an earlier fetch", target.parent / stale)
            shutil.rmtree(target.parent / stale, ignore_errors=True)
        except BlockingIOError:
            pass                             # another fetch of this tag is at work in it
        finally:
            os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _asset(release: dict, name: str, tag: str) -> dict:
    assets = [a for a in release.get("assets") or [] if isinstance(a, dict)]
    for asset in assets:
        if asset.get("name") == name:
            return asset
    names = ", ".join(str(a.get("name")) for a in assets) or "none"
    raise FetchError(f"release {tag} has no asset named {name} (it has: {names[:200]})")


def _check_sha256(listing: bytes, listing_name: str, asset: str, sha256: str) -> None:
    for line in listing.decode("utf-8", "replace").splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*").removeprefix("./") == asset:
            if digest.lower() != sha256:
                raise FetchError(f"{asset}: sha256 {sha256} does not match {digest} in {listing_name}")
            return
    raise FetchError(f"{listing_name}: no sha256 line for {asset}")


# --- the release API ----------------------------------------------------------------------------

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


# --- safe extraction ----------------------------------------------------------------------------

def extract(archive: Path, asset: str, into: Path, binary: Path) -> None:
    """Unpacks a .zip or .tar.gz asset into `into`, refusing anything that could write outside it
    (.., absolute names, links) or fill the disk (sizes checked before writing, then counted).
    Any other asset is the binary itself."""
    if asset.endswith(".zip"):
        _unzip(archive, asset, into)
    elif asset.endswith((".tar.gz", ".tgz")):
        _untar(archive, asset, into)
    else:
        binary.parent.mkdir(parents=True, exist_ok=True)
        os.replace(archive, binary)


def _unzip(archive: Path, asset: str, into: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            entries = zf.infolist()
            _check_sizes(asset, [(e.filename, e.file_size) for e in entries])
            for e in entries:                  # every name and kind is judged before anything is written
                _target(into, e.filename, asset)
                _check_kind(asset, e.filename, (e.external_attr >> 16) if e.create_system == 3 else 0)
            for e in entries:
                dest = _target(into, e.filename, asset)
                if e.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(e) as src:
                    _write_entry(src, dest, e.file_size, e.external_attr >> 16, asset, e.filename)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as err:
        raise FetchError(f"{asset}: not a valid zip ({err})") from None


def _untar(archive: Path, asset: str, into: Path) -> None:
    total = 0
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for n, m in enumerate(tf):           # one header at a time: a bomb is refused at its header
                total += m.size
                _check_sizes(asset, [(m.name, m.size)], total, n + 1)
                dest = _target(into, m.name, asset)
                _check_kind(asset, m.name, stat.S_IFDIR if m.isdir() else stat.S_IFREG if m.isreg() else stat.S_IFLNK)
                if m.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                else:
                    _write_entry(tf.extractfile(m), dest, m.size, m.mode, asset, m.name)
    except (tarfile.TarError, zlib.error, EOFError) as err:
        raise FetchError(f"{asset}: not a valid .tar.gz ({err})") from None


def _check_sizes(asset: str, sizes: list[tuple[str, int]], total: int | None = None, count: int = 0) -> None:
    for name, size in sizes:
        if size > MAX_ENTRY_BYTES:
            raise FetchError(f"{asset}: {name} declares {size} bytes, over the {MAX_ENTRY_BYTES}-byte limit")
    total = sum(size for _, size in sizes) if total is None else total
    if total > MAX_TOTAL_BYTES or max(count, len(sizes)) > MAX_ENTRIES:
        raise FetchError(f"{asset}: over the limit of {MAX_TOTAL_BYTES} bytes or {MAX_ENTRIES} entries in all")


def _check_kind(asset: str, name: str, mode: int) -> None:
    """Regular files and folders only (mode 0: a zip without unix modes). No links, devices or fifos."""
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FetchError(f"{asset}: {name} is a link or special file; refusing it")


def _target(into: Path, name: str, asset: str) -> Path:
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or "\0" in name or ".." in parts or name[1:2] == ":":
        raise FetchError(f"{asset}: entry {name!r} would be written outside its folder; refusing it")
    return into.joinpath(*parts)


def _write_entry(src: BinaryIO, dest: Path, declared: int, mode: int, asset: str, name: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as out:            # "x": a second entry of the same name never overwrites
        written = 0
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > declared:
                raise FetchError(f"{asset}: {name} holds more than the {declared} bytes it declares")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())               # on disk before the folder is renamed into place
    os.chmod(dest, 0o755 if mode & 0o111 else 0o644)


# --- visor fetch --------------------------------------------------------------------------------

def fetch_command(home, tag: str) -> int:
    """`visor fetch --home H TAG`: the fetcher's work from the command line, even with auto-install off
    (the operator asked). Exit 0 only when the folder is ready and verified."""
    cfg, warnings = load_visor_config(home.config)
    for warning in warnings:
        print(f"visor: warning: {warning}", file=sys.stderr)
    folder = home.folder_for(tag, cfg)
    if os.path.lexists(folder):
        ensure_folder(folder, tag, home.current, None, lambda _msg: None)   # verify only; FetchError if not
        print(f"{folder}: already there and verified (vega reports {tag}); nothing to do")
        return 0
    current = home.current if os.path.lexists(home.current) else home.root / "genesis"   # as `run` would link it
    with _Console(tag) as console:
        ensure_folder(folder, tag, current / "run-config.toml", Source.from_settings(cfg.fields()), console)
    print(f"{folder}: ready and verified")
    return 0


class _Console:
    """What `visor fetch` shows: a progress bar on a terminal, a line per step (and per 10%) otherwise."""

    def __init__(self, tag: str):
        self.tag, self.bar, self.tty, self.shown = tag, None, sys.stderr.isatty(), -1

    def __call__(self, msg) -> None:
        match msg:
            case protocol.FetchStarted(asset=asset):
                print(f"fetching {asset} of release {self.tag}", flush=True)
            case protocol.FetchProgress(asset=asset, bytes=done, total=total) if self.tty:
                if self.bar is None:
                    from tqdm import tqdm            # only `visor fetch` on a terminal needs it
                    self.bar = tqdm(desc=asset, total=total or None, unit="B", unit_scale=True, leave=False)
                self.bar.update(done - self.bar.n)
            case protocol.FetchProgress(bytes=done, total=total) if total and done * 10 // total > self.shown:
                self.shown = done * 10 // total
                print(f"  {done} of {total} bytes ({self.shown * 10}%)", flush=True)
            case protocol.FetchCompleted(asset=asset, sha256=sha256):
                self.close()
                print(f"downloaded and checked {asset} (sha256 {sha256})", flush=True)

    def __enter__(self) -> _Console:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
