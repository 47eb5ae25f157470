"""The direct baseline: the least a Python parent can do to keep a child running.

`python -S direct.py ARGV...` starts ARGV with Popen, blocks in waitpid until it exits and starts it
again at once, forever. SIGTERM kills the child and leaves. No logging, no sockets, no state.
"""
import os
import signal
import subprocess
import sys

child = None


def leave(_signum, _frame):
    if child is not None:
        try:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    os._exit(0)


def main(argv):
    global child
    signal.signal(signal.SIGTERM, leave)
    while True:
        child = subprocess.Popen(argv)
        os.waitpid(child.pid, 0)           # blocking; Popen's own wait() holds a lock the handler would need
        child.returncode = 0               # reaped here: Popen must not try again


if __name__ == "__main__":
    main(sys.argv[1:])
