"""Archives built in memory for fetch and unzip tests: plain ones, hostile ones, and a release zip
that holds the fake vega. Stdlib only; nothing here touches the disk.

Entries are `name -> content` or `name -> (content, mode)`. A mode without file-type bits is a
regular file (a directory when the name ends in "/"); `stat.S_IFLNK | 0o777` makes a symlink whose
content is its target. Timestamps are fixed, so the same input always gives the same bytes.
"""
from __future__ import annotations

import gzip
import io
import posixpath
import stat
import struct
import tarfile
import zipfile
import zlib

from . import fake_vega_script

Entry = bytes | tuple[bytes, int]
_DATE = (2024, 1, 1, 0, 0, 0)
_MTIME = 1704067200  # the same instant, for tar
HUGE_SIZE = 10 << 30  # what make_evil_zip("huge") declares: 10 GiB


def _split(name: str, entry: Entry) -> tuple[bytes, int]:
    data, mode = (entry, None) if isinstance(entry, bytes) else entry
    is_dir = name.endswith("/")
    if mode is None:
        mode = 0o755 if is_dir else 0o644
    if not stat.S_IFMT(mode):
        mode |= stat.S_IFDIR if is_dir else stat.S_IFREG
    return data, mode


def make_zip(files: dict[str, Entry]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, entry in files.items():
            data, mode = _split(name, entry)
            info = zipfile.ZipInfo(name, date_time=_DATE)
            info.create_system = 3  # unix: unzip tools read the mode from the top half of external_attr
            info.external_attr = mode << 16
            if stat.S_ISDIR(mode):
                info.external_attr |= 0x10  # the MS-DOS directory bit, as zip(1) sets it
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def make_tar_gz(files: dict[str, Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, entry in files.items():
            data, mode = _split(name, entry)
            info = tarfile.TarInfo(name.rstrip("/") if stat.S_ISDIR(mode) else name)
            info.mtime, info.mode = _MTIME, stat.S_IMODE(mode)
            if stat.S_ISDIR(mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(mode):
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
            else:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return gzip.compress(buf.getvalue(), mtime=0)  # mtime=0: reproducible bytes


def make_evil_zip(kind: str, *, target: str | None = None) -> bytes:
    """A zip that a safe extractor must refuse (or contain): every kind also holds a harmless ok.txt.

    traversal  "../evil" (or `target`): climbs out of the extraction folder
    absolute   "/tmp/evil" (or `target`): an absolute path
    symlink    "link" -> "/tmp" (or `target`), then "link/evil" written through it
    huge       "vega" declaring HUGE_SIZE bytes (zip64) while holding 1 MiB: a size bound must trip
    """
    ok = {"ok.txt": b"ok\n"}
    if kind == "traversal":
        return make_zip({**ok, target or "../evil": b"evil\n"})
    if kind == "absolute":
        return make_zip({**ok, target or "/tmp/evil": b"evil\n"})
    if kind == "symlink":
        return make_zip({**ok, "link": ((target or "/tmp").encode(), stat.S_IFLNK | 0o777),
                         "link/evil": b"evil\n"})
    if kind == "huge":
        return _forged_size_zip("vega", b"\0" * (1 << 20), HUGE_SIZE)
    raise ValueError(f"unknown evil zip kind {kind!r}")


def _forged_size_zip(name: str, data: bytes, declared: int) -> bytes:
    """One deflated entry whose headers claim `declared` uncompressed bytes (in a zip64 extra field).

    Written by hand because zipfile records true sizes. The CRC is that of the real data, so an
    extractor that trusts the header sees a 10 GiB file; one that counts bytes sees 1 MiB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as zip stores it
    packed = packer.compress(data) + packer.flush()
    crc, raw_name, dos_time, dos_date = zlib.crc32(data), name.encode(), 0, (44 << 9) | (1 << 5) | 1
    zip64 = struct.pack("<HHQQ", 0x0001, 16, declared, len(packed))  # uncompressed, then compressed
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, zipfile.ZIP_DEFLATED, dos_time, dos_date,
                        crc, 0xFFFFFFFF, 0xFFFFFFFF, len(raw_name), len(zip64)) + raw_name + zip64
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 45, 45, 0, zipfile.ZIP_DEFLATED,
                          dos_time, dos_date, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(raw_name), len(zip64),
                          0, 0, 0, (stat.S_IFREG | 0o755) << 16, 0) + raw_name + zip64
    body = local + packed
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(body), 0)
    return body + central + end


def corrupt(data: bytes, how: str = "flip") -> bytes:
    """flip: same length, 16 bytes inverted a third of the way in (checksum and CRC failures);
    truncate: the first half only (no central directory: not a zip any more)."""
    if how == "truncate":
        return data[: len(data) // 2]
    if how != "flip":
        raise ValueError(f"unknown corruption {how!r}")
    at = len(data) // 3
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + 16]) + data[at + 16:]


def release_zip_with_fake_vega(version: str, binary_name: str = "vega") -> bytes:
    """A release asset: the fake vega as `binary_name` (mode 0o755 in external_attr) with its VERSION
    beside it, so `<binary> version --output json` reports `version` once unzipped."""
    version_file = posixpath.join(posixpath.dirname(binary_name), "VERSION")
    return make_zip({binary_name: (fake_vega_script(), 0o755), version_file: f"{version}\n".encode()})
