"""What Visor needs from Linux beyond the os module: the kernel version check, a rename that never replaces.

Owns calls into libc through ctypes, each checked for its return value and errno, and the one check of
the running kernel. It decides nothing and touches no file on its own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

from visor.errors import VisorError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
PIDFD_KERNEL = (5, 3)            # pidfd_open(2): how Visor watches every process it depends on


def require_kernel(minimum: tuple[int, int] = PIDFD_KERNEL, release: str | None = None) -> None:
    """Raises VisorError, one line, when the running kernel (os.uname) is older than `minimum`. A release
    string that names no version (a custom build) is let through: the first pidfd_open would then say."""
    release = os.uname().release if release is None else release
    if (found := re.match(r"(\d+)\.(\d+)", release)) and tuple(map(int, found.groups())) < minimum:
        need = ".".join(map(str, minimum))
        raise VisorError(f"Linux {release}: Visor needs Linux {need} or later (it watches processes through pidfds)")


def rename_noreplace(src: Path, dst: Path) -> None:
    """Renames src to dst in one step, failing with FileExistsError if dst exists, whatever it is.
    (os.rename of a folder onto an EMPTY folder silently replaces it.) On a file system without
    RENAME_NOREPLACE (EINVAL) it checks and renames, which leaves a window of microseconds."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err != errno.EINVAL:
        raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)
