"""The supervised child of every benchmark, run as `python -S child.py MODE LOG [ARGS]`.

It appends one line per moment to LOG (O_APPEND, one write per line): `<mark> <pid> <CLOCK_MONOTONIC>`.
  crash [MS] s (first line), lives a random 0..MS ms (0 by default), e (just before exit), exit code 1
  idle       s, then sleeps until a signal ends it
  write MIB MS N   s, then N passes: a pause (MS ms before the first, 250 ms before the others), a
             scratch file written and deleted (see warm), bK (before its first write), MIB writes of
             1 MiB to stdout, wK (after its last); then sleeps
It imports only builtin modules, so nothing but the interpreter's own start-up precedes the s line.
"""
import os
import sys
import time

T0 = time.monotonic()


def note(fd, mark, t=None):
    os.write(fd, b"%s %d %.9f\n" % (mark, os.getpid(), time.monotonic() if t is None else t))


def write_all(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]    # a pipe may take less than asked


def warm(path, block, mib):
    """Writes and deletes a scratch file, so the page cache of the pass to come reuses pages the VM has
    just backed: on this kind of VM, memory left unused for a second or two goes cold, and filling
    cold pages runs at ~0.5 GB/s instead of ~5, which would measure the VM rather than the supervisor."""
    scratch = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(mib):
        os.write(scratch, block)
    os.close(scratch)
    os.unlink(path)


def main(argv):
    mode, log = argv[0], argv[1]
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    note(fd, b"s", T0)
    if mode == "crash":
        if len(argv) > 2:                  # a crash at a random phase of a polling supervisor's cycle
            time.sleep(int.from_bytes(os.urandom(2), "big") / 65536 * float(argv[2]) / 1000)
        note(fd, b"e")
        os._exit(1)
    if mode == "write":
        block = b"x" * (1 << 20)
        mib, settle_ms, passes = int(argv[2]), float(argv[3]), int(argv[4])
        for k in range(1, passes + 1):
            time.sleep(settle_ms / 1000 if k == 1 else 0.25)
            warm(os.path.join(os.path.dirname(log), "scratch"), block, mib + mib // 4)
            note(fd, b"b%d" % k)
            for _ in range(mib):
                write_all(block)
            note(fd, b"w%d" % k)
    while True:
        time.sleep(3600)                   # SIGTERM's default action ends it


if __name__ == "__main__":
    main(sys.argv[1:])
