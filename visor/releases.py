"""From a release tag to a verified release folder: download, checksum, unpack, verify, rename into place.

Owns auto-install: fetching a release's asset (and checksums) through visor.github, unpacking it
with visor.archive, deriving the folder's run-config from the current one, verifying the result
and renaming it into place; also the verification of a folder that already exists. All of it
blocks, so only the fetcher worker and `visor fetch` call it, never the broker. All work happens in
HOME/.TAG.partial-XXXX beside the target: a crash or failure never leaves a folder that looks ready.
Reports (Fetch*) go to a callback as protocol messages. The GitHub token is sent to the
API's own host only; it is never logged and never part of an error.
"""

from __future__ import annotations

import fcntl
import glob
import io
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import tomli_w

from visor import protocol
from visor.archive import extract, safe_path
from visor.config import load_run_config, load_visor_config, read_toml, runnable
from visor.errors import ConfigError, FetchError, NodeError, VisorError
from visor.github import Client, Report, Source
from visor.home import fsync_dir
from visor.linux import rename_noreplace
from visor.nodeapi import binary_version

__all__ = ["Source", "check_folder", "derive_run_config", "ensure_folder", "fetch_command"]
log = logging.getLogger(__name__)

MAX_CHECKSUMS_BYTES = 1 << 20


# --- verify and install -------------------------------------------------------------------------

def check_folder(folder: Path, tag: str) -> str:
    """The reason `folder` cannot be upgraded to, or "": run-config, binaries, `version` == tag."""
    if not folder.is_dir():
        return f"{folder}: not a folder"
    try:
        rc = runnable(load_run_config(folder / "run-config.toml")[0], folder / "run-config.toml")
        for binary in rc.binaries().values():
            if not binary.path.is_file():
                return f"{binary.path}: binary not found"
            if not os.access(binary.path, os.X_OK):
                return f"{binary.path}: not executable"
        version = binary_version(str(rc.vega.path))
    except (ConfigError, NodeError) as err:
        return str(err)
    return "" if version == tag else f"version mismatch: {rc.vega.path} reports {version}, want {tag}"


def verification_inputs(folder: Path) -> tuple:
    """What a verification depended on: the folder (its inode: not replaced by another), its run-config
    and its binaries (inode, size, modification time: not replaced or edited)."""
    def seen(path: Path) -> tuple:
        st = os.stat(path)
        return path, st.st_ino, st.st_size, st.st_mtime_ns
    try:
        rc, _warnings = load_run_config(folder / "run-config.toml")
        return (folder.stat().st_ino, seen(folder / "run-config.toml"),
                *(seen(b.path) for b in rc.binaries().values()))
    except (ConfigError, OSError):
        return ()


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
        binary = safe_path(work.folder, source.binary_name, "autoInstall.asset.binaryName")
        extract(archive, source.asset, work.folder, binary)
        if not binary.is_file() or binary.is_symlink():
            raise FetchError(f"{source.asset}: holds no file named {source.binary_name}")
        binary.chmod(binary.stat().st_mode | 0o111)            # a+x, as the Go visor does
        (work.folder / "run-config.toml").write_bytes(run_config)   # on disk with the rest at commit
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
        """Renames folder/ into place, durable first: every file and folder in it is on disk before the
        rename, and the rename never replaces a folder that appeared meanwhile, even an empty one."""
        _fsync_tree(self.folder)
        try:
            rename_noreplace(self.folder, self.target)   # one step: before it no folder, after it a verified one
        except FileExistsError:              # someone else (an operator, another fetch) got there first
            if problem := check_folder(self.target, tag):
                raise FetchError(f"{self.target} appeared meanwhile: {problem}") from None
            return
        fsync_dir(self.target.parent)

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


def _fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder`, and `folder` itself, on disk: contents, modes, entries."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files + dirs:
            _fsync(os.path.join(root, name))
    _fsync(folder)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
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
