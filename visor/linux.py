"""What Visor needs from Linux that the os module does not offer: a rename that never replaces.

Owns calls into libc through ctypes, each checked for its return value and errno. It decides nothing
and touches no file on its own.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)


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
