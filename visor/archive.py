"""Safe extraction of a release asset: nothing outside its folder, no links, no disk-filling bombs.

Owns unpacking a downloaded .zip or .tar.gz into a folder Visor is preparing. Every entry name and
kind is judged before anything is written; declared sizes are bounded before writing and actual
bytes are counted while writing. It never downloads and never decides where the folder goes.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from visor.errors import FetchError

MAX_ENTRY_BYTES, MAX_TOTAL_BYTES, MAX_ENTRIES = 2 << 30, 4 << 30, 10_000
CHUNK = 256 * 1024


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
                safe_path(into, e.filename, asset)
                _check_kind(asset, e.filename, (e.external_attr >> 16) if e.create_system == 3 else 0)
            for e in entries:
                dest = safe_path(into, e.filename, asset)
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
                dest = safe_path(into, m.name, asset)
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


def safe_path(into: Path, name: str, asset: str) -> Path:
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
    os.chmod(dest, 0o755 if mode & 0o111 else 0o644)
